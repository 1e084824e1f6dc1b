"""Any prepared TFDS dataset as a task's input pool: `task.path = "tfds:NAME[/CONFIG][:SPLIT]"`.

Records are read by index through `tfds.data_source` (array_record files, no TensorFlow, no download); the task
turns each record into an example (`Task.from_record`, with `task.input_field` / `task.label_field`).
"""

from __future__ import annotations

from s2d_jax.errors import S2DError

PREFIX = "tfds:"


def load_tfds(task, spec: str, *, data_dir: str = "", input_field: str = "question", label_field: str = "",
              limit: int = 0) -> list:
    import tensorflow_datasets as tfds

    name, _, split = spec[len(PREFIX):].partition(":")
    split = split or "train"
    try:
        source = tfds.data_source(name, split=split, data_dir=data_dir or None, download=False, try_gcs=False)
    except Exception as e:  # noqa: BLE001 (tfds raises many kinds; all mean "not prepared here")
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise S2DError(f"config key 'task.path': {spec}: cannot open the prepared TFDS dataset ({first[:200]}); "
                       f"prepare it with `tfds build {name} --file_format=array_record` and set 'task.tfds_data_dir'"
                       ) from None
    count = min(limit, len(source)) if limit else len(source)
    return [task.from_record(source[i], f"{name}:{split}:{i}", input_field, label_field) for i in range(count)]
