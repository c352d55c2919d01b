"""LoRA: a frozen linear layer plus a trainable low-rank update (Hu et al., "LoRA: Low-Rank
Adaptation of Large Language Models", 2021).

    y = base(x) + s * B A dropout(x)        A: [r, in], B: [rows, r], s = alpha / r

with s = alpha / sqrt(r) under rank-stabilised LoRA (Kalajdzievski, "A Rank Stabilization Scaling
Factor for Fine-Tuning with LoRA", 2023). llmkit fuses q/k/v into one linear layer, so one
`LoRALinear` carries one (A, B) pair per adapted slice of its output rows (q and v, not k); the
slices' A matrices run as one matmul and their B matrices as one block matrix, so adapting q and v
costs two small matmuls per layer, not four.

Init (`lora_init`): "default" as peft (A Kaiming-uniform, B zero: outputs unchanged), "gaussian"
(A normal with std 1/r, B zero), "pissa" (Meng et al., "PiSSA: Principal Singular Values and
Singular Vectors Adaptation of Large Language Models", 2024: A and B from the top r singular
triplets of W, which keeps the residual W - s B A; outputs unchanged up to rounding).

Adapter tensors are keyed as `peft` writes them (`blocks.0.attn.q.lora_A.weight`), so adapters
move both ways between llmkit and peft (`llmkit.peft.files`).
"""
from __future__ import annotations

import itertools
import math
from typing import Any, ClassVar, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from llmkit.errors import UserError
from llmkit.peft.base import MergesWrappers, Method, copy_checked, freeze, register_method
from llmkit.peft.targets import Target, find_targets, group_by_module, replace_module

# TrainConfig's defaults, for callers that pass only some options
DEFAULTS: dict[str, Any] = {"rank": 8, "alpha": 16.0, "adapter_dropout": 0.0, "target_modules": None,
                            "rslora": False, "lora_init": "default"}
INITS = ("default", "gaussian", "pissa")


def lora_scale(alpha: float, rank: int, rslora: bool = False) -> float:
    """The update's scale: alpha / r (Hu et al. 2021), or alpha / sqrt(r) (rsLoRA, Kalajdzievski 2023)."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def pissa_factors(weight: torch.Tensor, rank: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(A, B, residual) for PiSSA (Meng et al. 2024): W = U S V^T, B = U_r sqrt(S_r / s),
    A = sqrt(S_r / s) V_r^T, residual = W - s B A (so base + s B A is W again)."""
    w = weight.float()
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    root = (sv[:rank] / scale).sqrt()
    a = root[:, None] * vh[:rank]
    b = u[:, :rank] * root[None, :]
    return a, b, (w - scale * b @ a).to(weight.dtype)


def block_rows(blocks: list[torch.Tensor], spans: list[tuple[int, int]], out_features: int) -> torch.Tensor:
    """One [out_features, n*r] matrix holding each B_i [rows_i, r] at its rows and in its own r
    columns, zero elsewhere: h @ block^T adds every slice's B_i h_i into its rows at once."""
    n, r = len(blocks), blocks[0].shape[1]
    pieces, at = [], 0
    for i, (b, (start, stop)) in enumerate(zip(blocks, spans)):
        if start > at:
            pieces.append(b.new_zeros(start - at, n * r))
        pieces.append(F.pad(b, (i * r, (n - 1 - i) * r)) if n > 1 else b)
        at = stop
    if out_features > at:
        pieces.append(blocks[0].new_zeros(out_features - at, n * r))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def spread_rows(values: list[torch.Tensor], spans: list[tuple[int, int]], out_features: int,
                fill: float = 0.0) -> torch.Tensor:
    """One [out_features] vector holding each slice's [rows_i] values at its rows, `fill` elsewhere."""
    pieces, at = [], 0
    for v, (start, stop) in zip(values, spans):
        if start > at:
            pieces.append(v.new_full((start - at,), fill))
        pieces.append(v)
        at = stop
    if out_features > at:
        pieces.append(values[0].new_full((out_features - at,), fill))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def adapter_dtype(base_dtype: torch.dtype) -> torch.dtype:
    """The dtype adapter parameters train in: float32 under a 16-bit or quantized base (as peft's
    autocast_adapter_dtype: small updates survive the optimizer), else the base's (float64 stays)."""
    return base_dtype if base_dtype in (torch.float32, torch.float64) else torch.float32


def dense_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's [out, in] weight (a quantized layer gives its dequantized one)."""
    if hasattr(base, "dequantized_weight"):
        return base.dequantized_weight()
    if isinstance(getattr(base, "weight", None), torch.Tensor):
        return base.weight
    raise UserError(f"{type(base).__name__} has no dense weight (DoRA's row norms need one): adapt it with "
                    "--method lora or qlora")


def mergeable_weight(base: nn.Module) -> torch.Tensor:
    """The base layer's dense weight parameter, to merge into (a UserError for a quantized layer)."""
    weight = getattr(base, "weight", None)
    if not isinstance(weight, torch.Tensor) or not weight.is_floating_point():
        raise UserError(f"cannot merge into a {type(base).__name__} (its weight is quantized): dequantize the base "
                        "model first, or keep the adapter unmerged")
    return weight


class AdaptedLinear(nn.Module):
    """A frozen linear-like layer (anything with in_features, out_features and a forward) plus an
    additive update on some spans of its output rows; what LoRA, DoRA and VeRA wrappers share:
    the spans, and merging by adding `delta_weights` into the base weight's rows."""

    def __init__(self, base: nn.Module, spans: list[tuple[int, int] | None]) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.spans = sorted(s or (0, self.out_features) for s in spans)
        if any(a[1] > b[0] for a, b in zip(self.spans, self.spans[1:])):
            raise UserError(f"overlapping adapted rows {self.spans}: target each slice once")
        self.merged = False

    def adapter_kwargs(self) -> dict[str, Any]:
        """device and dtype for new adapter parameters (see `adapter_dtype`)."""
        ref = next(itertools.chain(self.base.parameters(), self.base.buffers()), None)  # a quantized layer: its codes
        if ref is None:
            return {"dtype": torch.float32}
        return {"device": ref.device, "dtype": adapter_dtype(ref.dtype)}

    def delta_weights(self) -> list[torch.Tensor]:
        """What merging adds to each span's rows of the base weight ([rows_i, in])."""
        raise NotImplementedError

    def merge(self) -> None:
        """Fold the update into the base weight (forward is then the base alone)."""
        if not self.merged:
            self._fold(+1)
            self.merged = True

    def unmerge(self) -> None:
        """Take a merged update out of the base weight again."""
        if self.merged:
            self._fold(-1)
            self.merged = False

    def _fold(self, sign: int) -> None:
        weight = mergeable_weight(self.base)
        with torch.no_grad():
            for delta, (start, stop) in zip(self.delta_weights(), self.spans):
                weight[start:stop] += sign * delta.to(weight.dtype)


# peft config fields llmkit's adapters do not implement: an adapter setting one is refused (field -> what it does)
UNREAD_LORA = {"rank_pattern": "per-module ranks", "alpha_pattern": "per-module alphas",
               "layers_to_transform": "adapters on some layers only", "exclude_modules": "excluded modules",
               "target_parameters": "adapters on parameters",
               "layer_replication": "replicated layers", "trainable_token_indices": "trained token embeddings"}


def refuse_unread(config: Mapping[str, Any], fields: Mapping[str, str]) -> None:
    """UserError for the first of `fields` a peft adapter_config.json sets (a non-empty value)."""
    for field, meaning in fields.items():
        if config.get(field):
            raise UserError(f"the adapter sets {field} ({meaning}), which llmkit does not read: re-train or re-save it "
                            f"without {field}")


def peft_targets(config: Mapping[str, Any]) -> str:
    """A peft config's target_modules as llmkit target patterns ("q_proj,v_proj"); peft's regex form
    (one string that is not a plain name) is refused."""
    targets = config["target_modules"]
    if isinstance(targets, str):
        if not targets.replace("_", "").isalnum() and targets != "all-linear":
            raise UserError(f"the adapter's target_modules is the regular expression {targets!r}, which llmkit does "
                            "not read: re-save it with target_modules as a list of module names")
        return targets
    return ",".join(targets)


class LoRALinear(AdaptedLinear):
    """A frozen linear-like layer with a LoRA update on each of the given row spans of its output
    (None: all rows)."""

    def __init__(self, base: nn.Module, spans: list[tuple[int, int] | None], rank: int, alpha: float,
                 dropout: float = 0.0, rslora: bool = False) -> None:
        super().__init__(base, spans)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scale = lora_scale(alpha, rank, rslora)
        kw = self.adapter_kwargs()
        self.lora_A = nn.ParameterList([nn.Parameter(torch.empty(rank, self.in_features, **kw)) for _ in self.spans])
        self.lora_B = nn.ParameterList([nn.Parameter(torch.zeros(b - a, rank, **kw)) for a, b in self.spans])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset("default")

    # --- init --------------------------------------------------------------------------------

    def reset(self, init: str = "default") -> None:
        """(Re)initialise every (A, B) pair: see the module docstring for the three inits."""
        with torch.no_grad():
            if init == "pissa":
                weight = mergeable_weight(self.base)  # PiSSA rewrites the base weight as the residual
                for a, b, (start, stop) in zip(self.lora_A, self.lora_B, self.spans):
                    fa, fb, residual = pissa_factors(weight[start:stop], self.rank, self.scale)
                    a.copy_(fa)
                    b.copy_(fb)
                    weight[start:stop] = residual
                return
            for a, b in zip(self.lora_A, self.lora_B):
                if init == "gaussian":
                    nn.init.normal_(a, std=1 / self.rank)
                else:  # as nn.Linear's default init, as peft and Hu et al.'s loralib do
                    nn.init.kaiming_uniform_(a, a=math.sqrt(5))
                b.zero_()

    # --- forward -----------------------------------------------------------------------------

    def low_rank(self, x: torch.Tensor) -> torch.Tensor:
        """s * A_i x for every slice side by side: [..., n*r] (one matmul for all slices)."""
        a = self.lora_A[0] if len(self.lora_A) == 1 else torch.cat(list(self.lora_A))
        return F.linear(x.to(a.dtype), a) * self.scale

    def update(self, h: torch.Tensor) -> torch.Tensor:
        """B h on the full output width (zero on the rows no slice covers)."""
        return F.linear(h, block_rows(list(self.lora_B), self.spans, self.out_features))

    def delta_weights(self) -> list[torch.Tensor]:
        """s * B_i A_i per slice ([rows_i, in]): what merging adds to the base weight's rows."""
        return [self.scale * b @ a for a, b in zip(self.lora_A, self.lora_B)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + self.update(self.low_rank(self.dropout(x))).to(y.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}, spans={self.spans}, scale={self.scale:.4g}"


@register_method("lora")
class LoRA(MergesWrappers, Method):
    """Low-rank adapters on the target linear layers (default q and v), base frozen; see the
    module docstring."""

    peft_type: ClassVar[str | None] = "LORA"
    options: ClassVar[tuple[str, ...]] = ("rank", "alpha", "adapter_dropout", "target_modules", "rslora", "lora_init")
    mergeable: ClassVar[bool] = True
    default_targets: ClassVar[str] = "q,v"
    use_dora: ClassVar[bool] = False

    def __init__(self, opts: Mapping[str, Any]) -> None:
        super().__init__(opts)
        self.opts = {**{k: DEFAULTS[k] for k in self.options if k in DEFAULTS}, **self.opts}
        self.wrappers: dict[str, AdaptedLinear] = {}  # module path -> its wrapper (kept while merged too)
        self.merged = False

    @classmethod
    def check_settings(cls, opts: Mapping[str, Any]) -> None:
        init = opts.get("lora_init", "default")
        if init not in INITS:
            raise UserError(f"lora_init {init!r} is not one of {', '.join(INITS)}: choose one of them")
        if int(opts.get("rank", 8)) < 1:
            raise UserError(f"rank {opts.get('rank')} must be at least 1: give --rank 8 for example")
        if not 0.0 <= float(opts.get("adapter_dropout", 0.0)) < 1.0:
            raise UserError(f"adapter_dropout {opts.get('adapter_dropout')} must be in [0, 1): give e.g. 0.05")

    # --- apply -------------------------------------------------------------------------------

    def prepare(self, model: nn.Module, targets: list[Target]) -> None:
        """Before the layers are wrapped (VeRA builds its shared projections here)."""

    def wrap(self, base: nn.Module, targets: list[Target]) -> AdaptedLinear:
        """The adapter module for one linear layer carrying `targets` (DoRA and QLoRA override)."""
        o = self.opts
        return LoRALinear(base, [t.rows for t in targets], int(o["rank"]), float(o["alpha"]),
                          float(o["adapter_dropout"]), bool(o["rslora"]))

    def apply(self, model: nn.Module) -> nn.Module:
        if any(isinstance(m, AdaptedLinear) for m in model.modules()):
            raise UserError("the model already carries adapters: apply one per model (merge the first one in "
                            "with `llmkit merge` to stack another)")
        freeze(model)
        self.targets = find_targets(model, self.opts.get("target_modules") or self.default_targets)
        self.prepare(model, self.targets)
        for path, targets in group_by_module(self.targets).items():
            base = model.get_submodule(path)
            wrapper = self.wrap(base, targets)
            init = self.opts.get("lora_init", "default")
            if init != "default":
                wrapper.reset(init)
            replace_module(model, path, wrapper)
            self.wrappers[path] = wrapper
        return model

    def _slots(self) -> list[tuple[Target, AdaptedLinear, int]]:
        """(target, its wrapper, the target's index among the wrapper's spans)."""
        out = []
        for t in self.targets:
            w = self.wrappers[t.path]
            rows = t.rows or (0, w.out_features)
            out.append((t, w, w.spans.index(rows)))
        return out

    # --- what is saved -----------------------------------------------------------------------

    def slot_tensors(self, wrapper: AdaptedLinear, i: int) -> dict[str, nn.Parameter]:
        """suffix -> the parameter of slice `i` of `wrapper`, as peft names it."""
        return {"lora_A.weight": wrapper.lora_A[i], "lora_B.weight": wrapper.lora_B[i]}

    def adapter_tensors(self, model: nn.Module) -> dict[str, torch.Tensor]:
        self._check_unmerged("save")
        return {f"{t.name}.{suffix}": p.detach() for t, w, i in self._slots()
                for suffix, p in self.slot_tensors(w, i).items()}

    def load_adapter_tensors(self, model: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
        self._check_unmerged("load")
        params = {f"{t.name}.{suffix}": p for t, w, i in self._slots() for suffix, p in self.slot_tensors(w, i).items()}
        copy_checked(params, tensors, source)

    def peft_config(self, target_modules: list[str]) -> dict[str, Any]:
        o = self.opts
        init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[o["lora_init"]]
        return {"peft_type": "LORA", "r": int(o["rank"]), "lora_alpha": float(o["alpha"]),
                "lora_dropout": float(o["adapter_dropout"]), "target_modules": target_modules,
                "use_rslora": bool(o["rslora"]), "init_lora_weights": init, "bias": "none",
                # GPT-2's Conv1D stores [in, out]: peft needs to know (llmkit's layers are [out, in])
                "fan_in_fan_out": any(m in ("c_attn", "c_proj", "c_fc") for m in target_modules),
                "use_dora": self.use_dora, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                "layers_to_transform": None, "layers_pattern": None, "lora_bias": False}

    @classmethod
    def reads_peft_config(cls, config: Mapping[str, Any]) -> bool:
        return config.get("peft_type") == "LORA" and bool(config.get("use_dora", False)) == cls.use_dora

    @classmethod
    def options_from_peft(cls, config: Mapping[str, Any]) -> dict[str, Any]:
        refuse_unread(config, UNREAD_LORA)
        if config.get("bias", "none") != "none" or config.get("lora_bias"):
            raise UserError("the adapter trains biases (bias != 'none'), which llmkit's LoRA does not: re-train with "
                            "bias='none'")
        targets = peft_targets(config)
        init = config.get("init_lora_weights", True)
        if init not in (True, False, "gaussian", "pissa"):
            raise UserError(f"the adapter was initialised with init_lora_weights={init!r}, which changes the base "
                            "weights in a way llmkit does not reproduce: convert it to a plain LoRA adapter with peft "
                            "(save_pretrained(..., path_initial_model_for_weight_conversion=...))")
        return {"rank": int(config["r"]), "alpha": float(config["lora_alpha"]),
                "adapter_dropout": float(config.get("lora_dropout", 0.0)),
                "target_modules": targets,
                "rslora": bool(config.get("use_rslora", False)),
                # the stored tensors replace A and B; PiSSA also rewrites the base as its residual, as peft does on load
                "lora_init": init if init in ("gaussian", "pissa") else "default"}

    # --- merge -------------------------------------------------------------------------------

    def _check_unmerged(self, what: str) -> None:
        if self.merged:
            raise UserError(f"cannot {what} the adapter while it is merged into the base weights: unmerge first")

