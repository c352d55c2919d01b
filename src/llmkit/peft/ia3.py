"""IA3: learned vectors that rescale the keys, the values and the feed-forward activations, base
frozen (Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", 2022: "(IA)^3, Infused Adapter by Inhibiting and Amplifying Inner Activations").

    k = l_k * (W_k x)     v = l_v * (W_v x)     FFN(x) = W_down (l_ff * act(W_up x ...))

l_k, l_v scale output rows of a linear layer (llmkit's fused q/k/v layer: the rows of its k and v
slices); l_ff scales the *input* of the MLP's down projection (a "feedforward" module in `peft`'s
terms). All start at one, so the adapted model's outputs are the base model's. Both fold into the
weights exactly (rows of W times l_k, columns of W_down times l_ff): `merge`.

Targets (`target_modules`, default k,v,down): any linear layer of the blocks or slice of the fused
q/k/v layer; the down projection is scaled on its input, every other target on its output.
Adapter tensors are keyed as `peft` writes them: `blocks.0.attn.k.ia3_l` ([rows, 1]) and
`blocks.0.mlp.down.ia3_l` ([1, in]); a `peft` IA3 adapter (its target_modules and
feedforward_modules matched against the Hugging Face module names as `peft` matches them) loads here.
"""
from __future__ import annotations

import weakref
from typing import Any, ClassVar, Mapping

import torch
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import MergesWrappers, Method, copy_checked, freeze, register_method
from llmkit.peft.files import IDENTITY, Naming, naming_for, peft_matches, shortest_ending
from llmkit.peft.targets import Target, candidates, find_targets, group_by_module, replace_module

DEFAULT_TARGETS = "k,v,down"
FEEDFORWARD = ("down",)  # llmkit targets scaled on their input (the paper's l_ff)
SUFFIX = "ia3_l"


class IA3Linear(nn.Module):
    """A frozen linear layer whose output rows `spans` (sorted, disjoint) are each scaled by a
    learned vector ([rows, 1]), and whose input is scaled by one ([1, in]) when `scale_input`."""

    def __init__(self, base: nn.Linear, spans: list[tuple[int, int]], scale_input: bool) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.spans = sorted(spans)
        if any(a[1] > b[0] for a, b in zip(self.spans, self.spans[1:])):
            raise UserError(f"overlapping IA3 rows {self.spans}: target each slice once")
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.out_l = nn.ParameterList([nn.Parameter(torch.ones(b - a, 1, **kw)) for a, b in self.spans])
        self.in_l = nn.Parameter(torch.ones(1, self.in_features, **kw)) if scale_input else None
        self.merged = False

    def output_scale(self) -> torch.Tensor | None:
        """[out_features]: each span's vector at its rows, one elsewhere (None: no output scaling)."""
        if not self.spans:
            return None
        pieces, at = [], 0
        for vec, (start, stop) in zip(self.out_l, self.spans):
            if start > at:
                pieces.append(vec.new_ones(start - at))
            pieces.append(vec.flatten())
            at = stop
        if self.out_features > at:
            pieces.append(self.out_l[0].new_ones(self.out_features - at))
        return torch.cat(pieces)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return self.base(x)
        if self.in_l is not None:
            x = x * self.in_l.flatten().to(x.dtype)
        y = self.base(x)
        scale = self.output_scale()
        return y if scale is None else y * scale.to(y.dtype)

    def merge(self) -> None:
        """Fold the vectors into the base weight (and bias): forward is then the base alone."""
        if not self.merged:
            self._fold(lambda w, s: w.mul_(s))
            self.merged = True

    def unmerge(self) -> None:
        """Divide a merged fold out again (exact up to rounding; a vector entry of 0 cannot be undone)."""
        if self.merged:
            self._fold(lambda w, s: w.div_(s))
            self.merged = False

    def _fold(self, op) -> None:
        with torch.no_grad():
            w, b = self.base.weight, self.base.bias
            scale = self.output_scale()
            if scale is not None:
                op(w, scale.to(w.dtype)[:, None])
                if b is not None:
                    op(b, scale.to(b.dtype))
            if self.in_l is not None:
                op(w, self.in_l.to(w.dtype))

    def extra_repr(self) -> str:
        return f"spans={self.spans}, scale_input={self.in_l is not None}"


@register_method("ia3")
class IA3(MergesWrappers, Method):
    """(IA)^3 vectors on the target layers (default k, v and the MLP's down projection's input);
    see the module docstring."""

    peft_type: ClassVar[str | None] = "IA3"
    options: ClassVar[tuple[str, ...]] = ("target_modules",)
    mergeable: ClassVar[bool] = True

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__(opts)
        # a peft adapter's own selection (options_from_peft): target, feedforward and excluded modules
        self.peft_modules: dict[str, Any] | None = opts.get("peft_modules")
        self.feedforward: set[str] = set()  # names of the targets scaled on their input
        self.wrappers: dict[str, IA3Linear] = {}  # module path -> wrapper (kept while merged, for unmerge)
        self.naming: Naming = IDENTITY  # how the adapted model's modules read in Hugging Face names
        self._model: Any = None  # a weak reference to the adapted model (its naming again at save time)
        self._places: list[str] = []
        self.merged = False

    # --- apply -------------------------------------------------------------------------------

    def _select(self, model: nn.Module) -> tuple[list[Target], set[str]]:
        """(targets, the names of those scaled on their input)."""
        if self.peft_modules is None:
            targets = find_targets(model, self.opts.get("target_modules") or DEFAULT_TARGETS)
            return targets, {t.name for t in targets if t.short in FEEDFORWARD}
        sel = self.peft_modules
        targets, feedforward = [], set()
        for t in candidates(model):
            try:
                hf = self.naming.to_hf(t.name)
            except UserError:  # no Hugging Face module of its own (a fused layer, or a slice of one)
                continue
            if peft_matches(hf, sel["target_modules"], "module") and not peft_matches(hf, sel.get("exclude_modules"),
                                                                                   "module"):
                targets.append(t)
                if peft_matches(hf, sel.get("feedforward_modules"), "text"):
                    feedforward.add(t.name)
        if not targets:
            raise UserError(f"the IA3 adapter's target_modules {sel['target_modules']!r} match no layer of this model: "
                            "the adapter was made for another model")
        return targets, feedforward

    def apply(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, IA3Linear) for m in model.modules()):
            raise UserError("the model already carries IA3 vectors: apply one IA3 adapter per model (merge the first "
                            "one in with `llmkit merge` to stack another)")
        freeze(model)
        self.naming, self._model = naming_for(model), weakref.ref(model)
        self._places = [t.name for t in candidates(model)]  # every adaptable place (peft names must single ours out)
        self.targets, self.feedforward = self._select(model)
        for path, targets in group_by_module(self.targets).items():
            base = model.get_submodule(path)
            if not isinstance(base, nn.Linear):
                raise UserError(f"IA3 needs a plain linear layer at {path}, found {type(base).__name__}: apply IA3 to "
                                "an unquantised model without other adapters")
            ff = [t for t in targets if t.name in self.feedforward]
            if ff and (len(targets) > 1 or ff[0].rows is not None):
                raise UserError(f"{ff[0].name} is a slice of the fused {path}: IA3 scales a feed-forward module's "
                                "input, which a slice does not have; use it on the MLP's down projection")
            spans = [t.rows or (0, base.out_features) for t in targets if t.name not in self.feedforward]
            wrapper = IA3Linear(base, spans, scale_input=bool(ff))
            replace_module(model, path, wrapper)
            self.wrappers[path] = wrapper
        return model

    # --- what is saved -----------------------------------------------------------------------

    def _params(self) -> dict[str, nn.Parameter]:
        """adapter key (`blocks.0.attn.k.ia3_l`) -> its vector."""
        out = {}
        for t in self.targets:
            w = self.wrappers[t.path]
            if t.name in self.feedforward:
                out[f"{t.name}.{SUFFIX}"] = w.in_l
            else:
                out[f"{t.name}.{SUFFIX}"] = w.out_l[w.spans.index(t.rows or (0, w.out_features))]
        return out

    def _check_unmerged(self, what: str) -> None:
        if self.merged:
            raise UserError(f"cannot {what} the IA3 adapter while it is merged into the base weights: unmerge first")

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        self._check_unmerged("save")
        return {name: p.detach() for name, p in self._params().items()}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self._check_unmerged("load")
        params = self._params()
        copy_checked(params, tensors, source)

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        """IA3Config fields; target_modules and feedforward_modules named by the shortest endings of
        the Hugging Face module paths that select exactly these modules as peft matches them (GPT-2's
        `mlp.c_proj`, not `c_proj`, which would take `attn.c_proj` too)."""
        model = self._model() if self._model is not None else None
        naming = naming_for(model) if model is not None else self.naming  # as llmkit.peft.files names the keys
        every = []
        for name in self._places:
            try:
                every.append(naming.to_hf(name))
            except UserError:
                continue
        try:
            chosen = {naming.to_hf(t.name) for t in self.targets}
        except UserError:  # a target the layout does not name (k of GPT-2's c_attn): llmkit's names, as the keys
            naming, every = IDENTITY, list(self._places)
            chosen = {t.name for t in self.targets}
        ff = {naming.to_hf(t.name) for t in self.targets if t.name in self.feedforward}
        ending = {p: shortest_ending(p, every, chosen, "module") for p in chosen}
        targets = set(ending.values())
        # feedforward_modules: the same names where they single out the input-scaled modules (peft
        # matches them by plain ending among the targets), else the shortest ending that does
        feedforward = {ending[p] if all(q in ff for q in chosen if peft_matches(q, [ending[p]], "text"))
                       else shortest_ending(p, list(chosen), ff, "text") for p in ff}
        return {"peft_type": "IA3", "target_modules": sorted(targets), "feedforward_modules": sorted(feedforward),
                # GPT-2's Conv1D stores [in, out] (peft needs to know; the vectors' shapes are the same)
                "fan_in_fan_out": any(m in ("c_attn", "c_proj", "c_fc") for m in target_modules),
                "init_ia3_weights": True, "modules_to_save": None, "exclude_modules": None}

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:

        def names(field: str) -> str | list[str] | None:
            value = config.get(field)
            return value if value is None or isinstance(value, str) else sorted(value)

        targets = names("target_modules")
        if targets is None:
            raise KeyError("target_modules")
        feedforward = names("feedforward_modules")
        if feedforward is None:  # peft's default for Llama-family models (and GPT-2's mlp.c_proj)
            feedforward = ["down_proj", "mlp.c_proj"]
        return {"target_modules": targets if isinstance(targets, str) else ",".join(targets),
                "peft_modules": {"target_modules": targets, "feedforward_modules": feedforward,
                                 "exclude_modules": names("exclude_modules")}}

    # --- merge -------------------------------------------------------------------------------
