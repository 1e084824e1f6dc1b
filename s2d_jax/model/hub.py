"""Models by Hugging Face hub id: `org/name` (or `hf://org/name`, optionally `/FILE.gguf` for one GGUF file of a
repo) that is not an existing path resolves through huggingface_hub into its cache (HF_HOME, HF_TOKEN and
HF_HUB_OFFLINE honoured), fetching only what s2d_jax reads: safetensors weights, `config.json`, tokenizer and chat
template files. Never pickles, never remote code. On several hosts, host 0 downloads first while the others wait,
then each resolves the id itself (a no-op where the cache is shared)."""

from __future__ import annotations

import functools
import logging
import os
import re

from s2d_jax.errors import S2DError

log = logging.getLogger("s2d")
HUB_ID = re.compile(r"^(?:hf://)?([A-Za-z0-9][\w.-]*/[\w.-]+)(?:/([^/]+\.gguf))?$")
# What loading a model and its tokenizer reads; nothing else is fetched (no *.bin, no *.pt, no code)
WANTED = ["*.safetensors", "*.safetensors.index.json", "config.json", "generation_config.json", "tokenizer.json",
          "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json", "added_tokens.json", "vocab.json",
          "merges.txt", "chat_template.jinja", "chat_template.json"]


def is_hub_id(path: str) -> bool:
    """A model path that names a hub repository rather than a local file or directory."""
    path = os.fspath(path)
    return bool(path) and not os.path.exists(path) and bool(HUB_ID.match(path))


def resolve(path: str, revision: str = "", config_only: bool = False, key: str = "model.path") -> str:
    """The local path of a model: `path` itself when it is not a hub id, else its downloaded snapshot directory
    (or GGUF file). `config_only` fetches `config.json` alone (`s2d plan` needs only shapes). `key`: the config key
    that named it (`tokenizer`, `teacher.path`, ...), for the error."""
    path = os.fspath(path)
    if not is_hub_id(path):
        return path
    return _resolve(path, revision or "", config_only, key)


@functools.cache
def _resolve(path: str, revision: str, config_only: bool, key: str) -> str:
    from s2d_jax.runtime import distributed

    import jax

    if jax.process_count() == 1:
        return _download(path, revision, config_only, key)
    failed = None
    if distributed.primary():
        try:
            _download(path, revision, config_only, key)
        except S2DError as e:
            failed = e
    if distributed.agree([failed is not None])[0]:  # every host learns how host 0 fared
        raise failed or S2DError(f"{key} {path!r}: host 0 could not download it from the hub")
    return _download(path, revision, config_only, key)


def _download(path: str, revision: str, config_only: bool, key: str) -> str:
    import huggingface_hub as hub
    from huggingface_hub import errors

    repo, gguf = HUB_ID.match(path).groups()
    where = f"{key} {path!r}" + (f" (revision {revision!r})" if revision else "")
    revision_key = key.rpartition(".")[0] + ".revision" if "." in key else "model.revision"
    log.info("resolving %s on the Hugging Face hub", where)
    try:
        if gguf:
            return hub.hf_hub_download(repo, gguf, revision=revision or None)
        return hub.snapshot_download(repo, revision=revision or None,
                                     allow_patterns=["config.json"] if config_only else WANTED)
    except errors.GatedRepoError:
        raise S2DError(f"{where}: a gated model; accept its licence on huggingface.co and set HF_TOKEN "
                       f"(or `hf auth login`)") from None
    except errors.RevisionNotFoundError:
        raise S2DError(f"{where}: no such revision of {repo} on the hub (config key {revision_key!r})") from None
    except errors.RepositoryNotFoundError:
        raise S2DError(f"{where}: not a local path, and no model {repo!r} on the Hugging Face hub (a private one "
                       f"needs HF_TOKEN)") from None
    except getattr(errors, "IncompleteSnapshotError", ()):
        raise S2DError(f"{where}: its copy in the hub cache is incomplete and the hub cannot be reached; rerun "
                       f"where it can (`hf download {repo}`)") from None
    except errors.LocalEntryNotFoundError:
        offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes")
        why = ("HF_HUB_OFFLINE is set" if offline else "the hub cannot be reached")
        raise S2DError(f"{where}: not a local path, and not in the hub cache ({why}); download it where the hub "
                       f"is reachable (`hf download {repo}`) into HF_HOME, or give a local path") from None
    except errors.EntryNotFoundError:
        raise S2DError(f"{where}: {repo} on the hub has no file {gguf!r}") from None
    except (errors.HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise S2DError(f"{where}: could not be fetched from the hub ({first})") from None
