"""The public data the tasks read, by name: each file pinned upstream (a commit or a hub revision), with its sha256,
size and licence. A config names data as `data:NAME` (the whole entry: its file, or its directory) or
`data:NAME/PATH` (one file of it); any other value is a path, as before.

Files are fetched on first use into `$S2D_DATA` (default `~/.cache/s2d_jax/data`) by pooch (huggingface_hub for
files on the hub): written under a temporary name, checked against the sha256, then renamed, so a cut download or
a wrong file never looks complete. `$S2D_DATA_MIRROR` (a directory or an http(s) base URL holding the same
relative paths as the cache, e.g. `coin_flip/coin_flip.json`) is tried before upstream: offline machines, a pod's
bucket, our CI. `S2D_DATA_OFFLINE=1` never goes upstream.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import shutil

from s2d_jax.errors import S2DError

log = logging.getLogger("s2d")
PREFIX = "data:"
GITHUB = "https://raw.githubusercontent.com/"
TIMEOUT_S = 30  # per connection attempt upstream or to an http mirror


@dataclasses.dataclass(frozen=True)
class File:
    path: str  # relative path in the cache and in a mirror
    url: str  # upstream, pinned: https://... or hf://datasets/ORG/NAME@REVISION/FILE
    sha256: str | None  # None: not known; fetched unverified, and said so
    size: int  # bytes


@dataclasses.dataclass(frozen=True)
class Dataset:
    name: str
    licence: str
    source: str  # who made it, and where the pinned copy lives
    files: tuple[File, ...]

    @property
    def root(self) -> str:
        """What `data:NAME` stands for: the one file, or the directory all the files share."""
        if len(self.files) == 1:
            return self.files[0].path
        return os.path.commonpath([f.path for f in self.files])

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def _github(repo: str, commit: str, base: str, local: str, files: list[tuple[str, str, int]]) -> tuple[File, ...]:
    """Files of `repo` at `commit`: (name under `base` upstream and under `local` here, sha256, size)."""
    return tuple(File(f"{local}/{name}", f"{GITHUB}{repo}/{commit}/{base}/{name}", sha, size)
                 for name, sha, size in files)


KOJIMA = ("kojima-takeshi188/zero_shot_cot", "5ef330fcdeec0cd26aee27943504f91f8ec1c33c")
RAR = ("uclaml/Rephrase-and-Respond", "6d510203a62b058cb2862690fa719421fffeece0")
FASTCHAT = ("lm-sys/FastChat", "0e6d3e4beaab66f4d3f93db72541a4abab8af28d")
FASTCHAT_ANSWERS = ("geronimi73/FastChat", "945194bb18cbbc2ef3630fc30087114da32085f0")  # the June 2023 answers
JUDGELAB = ("aliabbas-muhammadi/judgelab", "afdf0eaa55fdee9617bbc4d1821e5424b18f33ff")
OASST2_REVISION = "179dd21fc55192153d94adb0e0ce8f69e222bf75"

REGISTRY: dict[str, Dataset] = {d.name: d for d in (
    Dataset("last_letters", "none stated (the repository has no licence)",
            "Kojima et al. 2022, zero-shot CoT: 500 four-name lists",
            _github(*KOJIMA, "dataset/last_letters", "last_letters", [
                ("last_letters.json", "60e8d092d0a6423d3256e87e0c249b69aefea4cd27985082095fa4e93931fb02", 84400)])),
    Dataset("coin_flip", "none stated (the repository has no licence)",
            "Kojima et al. 2022, zero-shot CoT: 500 four-person coin flips",
            _github(*KOJIMA, "dataset/coin_flip", "coin_flip", [
                ("coin_flip.json", "68cf201737a1463ef6bed5419622805a8934d92bff6a28a9dfbf83be3135ba5a", 136576)])),
    Dataset("rar_last_letters_gpt4", "MIT",
            "Deng et al. 2023, Rephrase-and-Respond: last letters with GPT-4's rephrasings",
            _github(*RAR, "data", "last_letters", [
                ("last_letter_concatenation_gpt-4.json",
                 "0147618b499a60e47127c438a562d2ae43bb8d1d12da72842c4336f594af02e9", 80897)])),
    Dataset("rar_last_letters_gpt35", "MIT",
            "Deng et al. 2023, Rephrase-and-Respond: last letters with GPT-3.5's rephrasings",
            _github(*RAR, "data", "last_letters", [
                ("last_letter_concatenation_gpt-3.5-turbo-0613.json",
                 "a18eb9d7383ad4245ca0a81d0870ec63ab4d01772369c55868354592e6ce4d65", 74332)])),
    Dataset("gsm8k_train", "MIT", "Cobbe et al. 2021, GSM8K: 7,473 training problems",
            _github("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                    "grade_school_math/data", "gsm8k", [
                        ("train.jsonl", "17f347dc51477c50d4efb83959dbb7c56297aba886e5544ee2aaed3024813465",
                         4166206)])),
    Dataset("gsm8k_test", "MIT", "Cobbe et al. 2021, GSM8K: 1,319 test problems",
            _github("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c",
                    "grade_school_math/data", "gsm8k", [
                        ("test.jsonl", "3730d312f6e3440559ace48831e51066acaca737f6eabec99bccb9e4b3c39d14", 749738)])),
    Dataset("sycophancy_eval", "MIT (SycophancyEval's dataset card)",
            "Sharma et al. 2023, SycophancyEval answer.jsonl: the 1,817 neutral-template rows (ZHZisZZ/oocr's copy)",
            _github("ZHZisZZ/oocr", "6558f472f603f2cead82fbd769d067de174c745f", "oocr/mcq/datasets/sycophancy_eval",
                    "sycophancy_eval", [
                        ("answer.jsonl", "981d5b04700cb80df878303eb83c93fb32607b5d783a99550b44e02580c6db21",
                         1530877)])),
    Dataset("mt_bench", "Apache-2.0 (FastChat); CC-BY-4.0 (human judgments)",
            "Zheng et al. 2023, MT-bench: questions, GPT-4 references, judge prompts, six models' answers, human "
            "and GPT-4 pairwise judgments",
            _github(*FASTCHAT, "fastchat/llm_judge/data/mt_bench", "mt_bench", [
                ("question.jsonl", "119565adbab82227089cefdb44c8d7e2cf04dc0a0ec233634c82e7d4e2a944f7", 48929),
                ("reference_answer/gpt-4.jsonl",
                 "f957a5bc977badb66885ec970e6cd08527845780313f0995764260e5777b9b3f", 51109)])
            + _github(*FASTCHAT, "fastchat/llm_judge/data", "mt_bench", [
                ("judge_prompts.jsonl", "fd283293406d024f44c174b094ef48031d0687a4682fd3a56b29b138f80281b6", 10449)])
            + _github(*FASTCHAT_ANSWERS, "fastchat/llm_judge/data/mt_bench", "mt_bench", [
                ("model_answer/alpaca-13b.jsonl",
                 "80f4a8bf4665839d33fa0ea7f4b58824abf88d5a0edc9e7cc68a362fca88ef98", 66179),
                ("model_answer/claude-v1.jsonl",
                 "884c109de34721859bf7ffa0f7e525dfbc9fb0d99c1ee7c5488bfb2eb8f8c62c", 174683),
                ("model_answer/gpt-3.5-turbo.jsonl",
                 "c3c097c21f91e4b44a554d82e5d47516daf7e8240e13b2eca79d211afc1fdfd6", 158274),
                ("model_answer/gpt-4.jsonl",
                 "f65cdce00aa8567e9add118cabd34c2866291ed8f5c1d568f8da9a81d231d3e7", 199046),
                ("model_answer/llama-13b.jsonl",
                 "b96b9f1e0a7e4e669fecfecda1c33908fdc4c095e38346e84352ea254c0b2cbc", 130031),
                ("model_answer/vicuna-13b-v1.2.jsonl",
                 "bc9c414cc4e80274aa511ad6e622fdef70209b056f5ed9c1a78dd22549fef010", 191402)])
            + _github(*JUDGELAB, "data/snapshots/mtbench", "mt_bench/human_judgments", [
                ("human.jsonl", "7ae1ff9ad4a01c30936342dd5494493da9a7fe6538265df1f4c04d44e76fa5f3", 380027),
                ("gpt4_pair.jsonl", "ef1d3c8d0eb9824cd9ecdd50a4d5690f0c05382148a24801128cb5facb121238", 277130),
                ("LICENSE", "c317631fea8335b3a9b9d77ad5142812c3f4dbf9042d30eecf290601239acc0f", 952),
                ("PROVENANCE.json", "df4ae39f61fd97ce4ff27ecc7ffc1862ba3fd2390035aa9b4db1983ba9dfad11", 778)])),
    # sha256 and size as recorded by public projects that fetched this revision (no route to the hub here)
    Dataset("oasst2", "Apache-2.0", "Köpf et al. 2023, OpenAssistant OASST2: the ready-for-export flat messages",
            (File("oasst2/2023-11-05_oasst2_ready.messages.jsonl.gz",
                  f"hf://datasets/OpenAssistant/oasst2@{OASST2_REVISION}/2023-11-05_oasst2_ready.messages.jsonl.gz",
                  "a9f240c4c77aa1378364f70d37e753c07ba284e247b019d700e1947a0e5da751", 54301900),)),
)}


def data_dir() -> str:
    return os.environ.get("S2D_DATA") or os.path.join(os.path.expanduser("~"), ".cache", "s2d_jax", "data")


def is_name(value: str) -> bool:
    return isinstance(value, str) and value.startswith(PREFIX)


def lookup(spec: str) -> tuple[Dataset, tuple[File, ...], str]:
    """(the entry, the files `spec` needs, the relative path it stands for) for `data:NAME[/PATH]`."""
    name, _, sub = spec[len(PREFIX):].partition("/")
    if name not in REGISTRY:
        raise S2DError(f"{spec}: no data named {name!r} (names: {', '.join(REGISTRY)}; `s2d data list`)")
    entry = REGISTRY[name]
    if not sub:
        return entry, entry.files, entry.root
    wanted = f"{entry.root}/{sub}"
    files = tuple(f for f in entry.files if f.path == wanted or f.path.startswith(wanted + "/"))
    if not files:
        inside = ", ".join(os.path.relpath(f.path, entry.root) for f in entry.files)
        raise S2DError(f"{spec}: {name!r} has no file {sub!r} (it has: {inside})")
    return entry, files, wanted


def resolve(value: str) -> str:
    """A local path for a config's data value: `data:...` fetched (or found in the cache, verified), anything else
    returned as it is."""
    if not is_name(value):
        return value
    _, files, relative = lookup(value)
    for f in files:
        fetch_file(f)
    return os.path.join(data_dir(), relative)


def cached(f: File) -> bool:
    return os.path.isfile(os.path.join(data_dir(), f.path))


@functools.cache
def _verified(target: str, mtime_ns: int, size: int, sha256: str) -> bool:
    import pooch

    return pooch.file_hash(target) == sha256


def fetch_file(f: File) -> str:
    """The cached copy of `f`: verified if present, else fetched from the mirror, then upstream. A copy that fails
    its checksum is fetched again; a fetched file that fails it is not kept and is one error."""
    target = os.path.join(data_dir(), f.path)
    if os.path.isfile(target):
        stat = os.stat(target)
        if f.sha256 is None or _verified(target, stat.st_mtime_ns, stat.st_size, f.sha256):
            return target
        log.warning("%s: fails its checksum; fetching it again", target)
    failures = []
    for url, downloader in _sources(f):
        try:
            _retrieve(f, url, downloader, target)
        except OSError as e:  # unreachable, absent, refused (requests errors are OSErrors): try the next source
            failures.append(f"{url}: {_reason(e)}")
            continue
        except ValueError as e:  # pooch's checksum mismatch: the bad download was deleted
            got = re.search(r"but got (\w+)", str(e))
            raise S2DError(f"{f.path}: checksum mismatch from {url}: expected sha256 {f.sha256}, got "
                           f"{got.group(1) if got else '?'}; the file was not kept") from None
        if f.sha256 is None:
            import pooch

            log.warning("%s: no checksum is known for this file; fetched unverified from %s (sha256 %s)", f.path, url,
                        pooch.file_hash(target))
        return target
    mirror = os.environ.get("S2D_DATA_MIRROR")
    how = (f"S2D_DATA_MIRROR={mirror} lacks it or could not serve it" if mirror else
           "set S2D_DATA_MIRROR to a directory or http(s) URL holding it (or copy it to that path)")
    tried = "; ".join(failures) or "S2D_DATA_OFFLINE is set and there is no mirror"
    raise S2DError(f"{f.path}: cannot fetch ({tried}); {how} [cache: {target}]")


def _sources(f: File):
    """(url, pooch downloader) to try in order: the mirror, then upstream unless S2D_DATA_OFFLINE is set."""
    import pooch

    mirror = os.environ.get("S2D_DATA_MIRROR", "").strip()
    if mirror.startswith(("http://", "https://")):
        yield mirror.rstrip("/") + "/" + f.path, pooch.HTTPDownloader(progressbar=True, timeout=TIMEOUT_S)
    elif mirror:
        yield os.path.join(os.path.abspath(os.path.expanduser(mirror)), f.path), _copy
    if os.environ.get("S2D_DATA_OFFLINE", "").lower() in ("1", "true", "yes"):
        return
    if f.url.startswith("hf://"):
        yield f.url, _hub
    else:
        yield f.url, pooch.HTTPDownloader(progressbar=True, timeout=TIMEOUT_S)


def _retrieve(f: File, url: str, downloader, target: str) -> None:
    import pooch

    pooch.get_logger().setLevel(logging.WARNING)
    log.info("fetching %s from %s", f.path, url)
    pooch.retrieve(url, known_hash=f"sha256:{f.sha256}" if f.sha256 else None, fname=os.path.basename(target),
                   path=os.path.dirname(target), downloader=downloader)
    os.chmod(target, 0o644)  # pooch's temporary file is private; a shared cache is read by every user


def _copy(url: str, output_file: str, pooch) -> None:
    """A pooch downloader for a mirror that is a directory."""
    shutil.copyfile(url, output_file)


def _hub(url: str, output_file: str, pooch) -> None:
    """A pooch downloader for `hf://datasets/ORG/NAME@REVISION/FILE`, through huggingface_hub (HF_TOKEN, HF_HOME
    and HF_HUB_OFFLINE honoured)."""
    from huggingface_hub import hf_hub_download

    kind, org, name, filename = url[len("hf://"):].split("/", 3)
    name, _, revision = name.partition("@")
    try:
        local = hf_hub_download(f"{org}/{name}", filename, repo_type=kind.rstrip("s"), revision=revision or None)
    except Exception as e:  # the hub's errors are many types; to the caller they all mean "not from here"
        raise OSError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
    shutil.copyfile(local, output_file)


def _reason(e: BaseException) -> str:
    import requests

    if isinstance(e, FileNotFoundError):
        return "no such file"
    if isinstance(e, requests.ConnectionError):
        return "cannot connect (no network, or the host is unreachable)"
    if isinstance(e, requests.HTTPError) and e.response is not None:
        return f"HTTP {e.response.status_code}"
    text = str(e).splitlines()[0] if str(e) else type(e).__name__
    return text[:200]


def fetch(names: list[str]) -> tuple[list[str], list[str]]:
    """`s2d data fetch`: every file of the named entries (all entries when none is named), going on past an entry
    it cannot fetch: (the cache paths of those it fetched, one line per entry it could not: why). A misspelt name
    fetches nothing."""
    unknown = [n for n in names if n not in REGISTRY]
    if unknown:
        raise S2DError(f"no data named {unknown[0]!r} (names: {', '.join(REGISTRY)})")
    paths, failures = [], []
    for name in names or list(REGISTRY):
        try:
            paths.append(resolve(PREFIX + name))
        except S2DError as e:  # (a file is written whole or not at all: a partial entry shows in `s2d data list`)
            failures.append(f"{name}: {e}")
    return paths, failures


def table() -> str:
    """`s2d data list`: name, licence, size, whether it is in the cache, and its source."""
    rows = [("name", "licence", "size", "cached", "source")]
    for d in REGISTRY.values():
        have = sum(cached(f) for f in d.files)
        state = "yes" if have == len(d.files) else f"{have}/{len(d.files)} files" if have else "no"
        rows.append((d.name, d.licence, _human(d.size), state, d.source))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4] for r in rows]
    return "\n".join(lines) + f"\n\ncache: {data_dir()}  mirror: {os.environ.get('S2D_DATA_MIRROR') or '(none)'}"


def _human(size: int) -> str:
    return f"{size / 1e6:.1f} MB" if size >= 1e6 else f"{size / 1e3:.0f} kB"
