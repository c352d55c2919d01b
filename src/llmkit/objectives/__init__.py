"""Training objectives: each a `Task` (its data set-up, batches and loss) registered in `TASKS`,
so `llmkit train --task NAME` trains it with the unchanged loop. See `objectives.task`."""
from llmkit.objectives.task import TASK_MODULES, TASKS, Batch, Task, TaskOptions, get_task, move_to, register_task, task_names
from llmkit.objectives.clm import CausalLMTask  # registers "causal-lm"

__all__ = ["TASK_MODULES", "TASKS", "Batch", "CausalLMTask", "Task", "TaskOptions", "get_task", "move_to", "register_task",
           "task_names"]
