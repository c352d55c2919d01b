"""Training objectives: each a `Task` (its data set-up, batches and loss) registered in `TASKS`,
so `llmkit train --task NAME` trains it with the unchanged loop. See `objectives.task`."""
from llmkit.objectives.task import TASKS, Batch, Task, TaskOptions, move_to, register_task
from llmkit.objectives.clm import CausalLMTask  # registers "causal-lm"

__all__ = ["TASKS", "Batch", "CausalLMTask", "Task", "TaskOptions", "move_to", "register_task"]
