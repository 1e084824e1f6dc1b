"""Tasks, found by name: `get_task("last_letters")`."""

from s2d_jax.errors import S2DError
from s2d_jax.system2.tasks.base import Example, Task
from s2d_jax.system2.tasks.coin_flip import CoinFlip
from s2d_jax.system2.tasks.gsm8k import GSM8K
from s2d_jax.system2.tasks.last_letters import LastLetters
from s2d_jax.system2.tasks.mt_bench import MTBenchJudge
from s2d_jax.system2.tasks.oasst2 import OASST2Judge
from s2d_jax.system2.tasks.sycophancy import Sycophancy

TASKS = {t.name: t for t in (CoinFlip, GSM8K, LastLetters, MTBenchJudge, OASST2Judge, Sycophancy)}


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise S2DError(f"unknown task {name!r} (tasks: {', '.join(sorted(TASKS))})")
    return TASKS[name]()


__all__ = ["Example", "Task", "TASKS", "get_task"]
