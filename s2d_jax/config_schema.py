"""The schema of every experiment config: each key, its default (and so its type) and, where a value can be wrong,
the rule it obeys (`config_rules`). `config.py` loads and checks configs against it."""

from __future__ import annotations

from s2d_jax.config_rules import _, above, at_least, between, each_of, mesh_size, one_of
from s2d_jax.model.attention import IMPLEMENTATIONS
from s2d_jax.model.config import DTYPES, REMAT
from s2d_jax.model.quant import KV_INT8, WEIGHTS_DTYPES
from s2d_jax.system2.adaptive import RULES as ADAPTIVE_RULES
from s2d_jax.system2.tasks.judge import DEFAULT_PROMPTS
from s2d_jax.trackers import TRACKERS

def schema() -> dict:
    """The schema: every key, its default (and so its type) and, where a value can be wrong, the rule it obeys."""
    return ({
        "seed": _(0, at_least(0)),  # sampling, data order, initialisation: the same seed, the same results
        "model": {
            # HF directory, .gguf file, or hub id (org/name, hf://org/name[/FILE.gguf]); "" = random `preset`
            "path": "",
            "revision": "",  # with a hub id: a branch, tag or commit ("" = main)
            "preset": "",  # a name in s2d_jax.model.PRESETS, used when `path` is ""
            # master parameter dtype of full fine-tuning (float32: bf16 rounds updates away)
            "dtype": _("float32", one_of(*DTYPES)),
            # "" = same as dtype; sampling, eval and LoRA's frozen base hold weights in it
            "compute_dtype": _("", one_of("", *DTYPES)),
            "scan_layers": False,  # stack the layers and run them under lax.scan (compile time flat in depth)
            "attention": _("auto", one_of(*IMPLEMENTATIONS)),  # kernel: s2d_jax/model/attention.py
            "splash_block": _(0, at_least(0)),  # the splash kernel's tile on TPU; 0 = by length (512/256/128)
        },
        "tokenizer": "",  # "" = model.path; a path or hub id; "bytes" = the built-in byte tokenizer
        # the training mesh's axes (their product: the devices); sampling uses `generate.mesh`
        "mesh": {
            "data": _(-1, mesh_size()),  # replicas of the model, each on its rows of the batch
            "fsdp": _(1, mesh_size()),  # parameters, gradients and optimizer state sharded over this axis too
            "tensor": _(1, mesh_size()),  # each layer's heads and MLP split over this axis (Megatron)
        },
        # several hosts: a host that sends no heartbeat for this long is lost, and the others stop (one line each)
        "cluster": {"heartbeat_timeout_s": _(20, at_least(2))},
        "convert": {"output": ""},  # "" = WORKDIR/converted
        "task": {
            "name": "",  # s2d_jax.system2.tasks.TASKS
            "path": "",  # the unlabelled input pool; "" = generate `n` examples (synthetic tasks)
            "n": _(0, at_least(0)),  # how many inputs to use (0 = all in `path`)
            "offset": _(0, at_least(0)),  # skip this many inputs of `path` first (keep the eval split apart)
            "size": _(4, at_least(1)),  # synthetic tasks: words (last letters) or people (coin flip) per input
            # synthetic tasks: > size mixes inputs of size..size_max words or people (in turn); 0 = all of `size`
            "size_max": _(0, at_least(0)),
            "seed": _(0, at_least(0)),  # sampling, data order, initialisation: the same seed, the same results  # synthetic tasks: generator seed
            # synthetic tasks: "names" = real first names, as the public sets use (the paper's pools);
            # "syllables" = made-up consonant-vowel words (the toy demo's syllable tokenizer needs them)
            "words": _("names", one_of("names", "syllables")),
            "lang": "en",  # judging pools with languages (OASST2): keep this language; "" = all
            # pairwise judging: FastChat's judge prompts (MT-bench's pair-v2 and its variants), read at run time
            "judge_prompts": DEFAULT_PROMPTS,
            "tfds_data_dir": "",  # with path "tfds:NAME[/CONFIG][:SPLIT]": where the prepared dataset lives
            "input_field": "question",  # TFDS records: the input field (dotted for nested)
            "label_field": "",  # TFDS records: the label field ("" = the task's default)
        },
        "program": {
            "name": "",  # s2d_jax.system2.programs.PROGRAMS
            "chat": True,
            "max_new_tokens": _(0, at_least(0)),  # > 0 sets every stage's token budget; 0 = each stage's own
            "stage_tokens": "",  # per-stage budgets over that, e.g. "rephrase=128,answer=512"
            "criteria": _(5, at_least(1)),  # BSM: criteria in the branch stage's evaluation plan (at most)
            # System 1 prompts (eval, and the distillation set's prompts) end with the program's answer-format
            # instruction and targets follow it, as the paper prompts System 1; False = the bare input and the bare
            # answer (the toy demo, whose pretraining corpus has no instruction)
            "system1_format": True,
        },
        "generate": {
            "samples": _(8, at_least(1)),  # System 2 samples per input (N)
            "temperature": _(0.7, at_least(0.0)),
            "top_k": _(0, at_least(0)),  # 0 = off
            "top_p": _(1.0, between(0.0, 1.0, low_open=True)),  # 1.0 = off
            "max_batch": _(32, at_least(1)),  # sequences per device batch
            "chunk": _(64, at_least(1)),  # inputs per rollout chunk written to disk (the resume granularity)
            # vote-aware sampling (majority filter): draw an input's samples `adaptive_wave` at a time, in sample
            # order, and stop once the vote cannot change ("decided") or by Adaptive-Consistency's Beta rule
            # ("beta", at `adaptive_confidence`); s2d_jax/system2/adaptive.py
            "adaptive": _("off", one_of(*ADAPTIVE_RULES)),
            "adaptive_wave": _(2, at_least(1)),
            "adaptive_confidence": _(0.95, between(0.5, 1.0, high_open=True)),
            # the KV cache's dtype while sampling ("" = the compute dtype); bfloat16 halves a float32 model's cache;
            # int8 halves a bf16 one (each key/value vector with its own scale: s2d_jax/model/quant.py)
            "cache_dtype": _("", one_of("", *DTYPES, KV_INT8)),
            # the mesh the sampler decodes on (generate, route, eval, USC, train's eval_every): the keys of `mesh`;
            # all 0 = chosen for decoding: tensor parallelism over a host's chips (as many as divide the heads and
            # kv heads), data replicas across the rest, FSDP only when a replica's weights would fill half a chip;
            # on CPU the training mesh (s2d_jax/mesh.py, generation_sizes)
            # the sampling models' projections: "" = the compute dtype; int8 = per-channel int8 (s2d_jax/model/quant.py)
            "weights_dtype": _("", one_of(*WEIGHTS_DTYPES)),
            "mesh": {"data": _(0, mesh_size(auto=True)), "fsdp": _(0, mesh_size(auto=True)),
                     "tensor": _(0, mesh_size(auto=True))},
        },
        "compile": {  # s2d_jax/runtime/compile_cache.py
            # JAX's persistent compilation cache: "" = $S2D_XLA_CACHE, else ~/.cache/s2d_jax/xla; "off"; a path
            # (a bucket path shared by a pod's hosts)
            "cache_dir": "",
            # compile the engine's programs for the generate stage's known prompts before its rollouts start
            "warmup": True,
        },
        "filter": {
            # majority (vote) | order_swap (pairwise judging, both orders) | usc (the model picks the most consistent
            # response) | none (the ablation: every input with a parsed first sample, its answer the target)
            "name": _("majority", one_of("majority", "order_swap", "usc", "none")),
            "min_share": _(0.5, between(0.0, 1.0)),  # the vote threshold: share of samples the top answer needs
            # the distillation target: "answer" = the parsed final answer; "response" = the chosen sample's whole
            # final response (S2A as the paper distils it, with usc); "auto" = response with usc, else answer
            "target": _("auto", one_of("auto", "answer", "response")),
        },
        "pretrain": {  # toy base models only (the CPU demo): random `model.preset` -> WORKDIR/base
            "steps": _(0, at_least(0)),  # 0 = no pretraining: the model is `model.path` (or a random preset)
            "corpus_size": _(4000, at_least(1)),  # synthetic prompt/target pairs (the task's `corpus`)
            "cot_max_words": _(6, at_least(1)),  # step-by-step answers for lists of 1..this many words
            "direct_max_words": _(2, at_least(0)),  # direct answers only for lists of 1..this many words
            "direct_share": _(0.3, between(0.0, 1.0)),
            # of the direct answers, this share are random-letter guesses for longer lists (System 1 unsure there)
            "guess_share": _(0.0, between(0.0, 1.0)),
            "batch_size": _(16, at_least(1)),
            "learning_rate": _(1e-3, above(0.0)),
            "warmup_steps": _(50, at_least(0)),
            "max_len": _(384, at_least(2)),
            "pack": True,
            "seed": _(0, at_least(0)),  # sampling, data order, initialisation: the same seed, the same results
        },
        "train": {
            "data": "",  # prompt/target JSONL; "" = WORKDIR/distill.jsonl
            "steps": _(100, at_least(1)),  # optimizer steps
            "batch_size": _(8, at_least(1)),  # rows per optimizer step, over all hosts and accumulation micro-steps
            "grad_accum": _(1, at_least(1)),  # micro-steps per optimizer step (batch_size must be a multiple)
            "max_len": _(256, at_least(2)),  # tokens per row; longer pairs are dropped and counted (or too_long)
            "too_long": _("drop", one_of("drop", "error")),  # drop | error
            "pack": False,  # pack several pairs per row (segment ids keep attention inside each pair)
            "learning_rate": _(1e-5, above(0.0)),  # peak, after warmup
            "schedule": _("cosine", one_of("cosine", "linear", "constant")),  # after warmup
            "warmup_steps": _(0, at_least(0)),
            "end_lr_ratio": _(0.1, between(0.0, 1.0)),  # final learning rate / peak (cosine, linear)
            "weight_decay": _(0.0, at_least(0.0)),  # AdamW; never applied to norms and biases
            "b1": _(0.9, between(0.0, 1.0, high_open=True)),
            "b2": _(0.999, between(0.0, 1.0, high_open=True)),
            "clip_norm": _(1.0, at_least(0.0)),  # global gradient norm clip; 0 = off
            "remat": _("none", one_of(*REMAT)),  # rematerialise each layer in the backward pass
            "lora_rank": _(0, at_least(0)),  # 0 = full fine-tuning; > 0 = LoRA adapters of this rank, base frozen
            "lora_alpha": _(16.0, above(0.0)),  # LoRA scale = lora_alpha / lora_rank (PEFT's convention)
            "lora_targets": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
            "loss_chunk": _(128, at_least(0)),  # positions per cross-entropy chunk (no [B, T, vocab] logits); 0 = off
            "seed": _(0, at_least(0)),  # sampling, data order, initialisation: the same seed, the same results  # data order and LoRA init
            "checkpoint_every": _(50, at_least(1)),  # steps between Orbax saves (and one at the end, and on SIGTERM)
            "keep_checkpoints": _(3, at_least(1)),
            "checkpoint_dir": "",  # "" = WORKDIR/checkpoints; or a gs:// path (Orbax writes it directly)
            "log_every": _(10, at_least(1)),  # steps between metrics rows
            "eval_every": _(0, at_least(0)),  # steps between System 1 accuracy checks on the eval split; 0 = off
            "peak_flops": _(0.0, at_least(0.0)),  # per-device FLOP/s for MFU; 0 = a matmul peak measured once per process
        },
        "plan": {  # `s2d plan`
            "device_gb": _(16.0, above(0.0)),  # memory per device to fit in (TPU v5e: 16, v5p: 95, H100: 80)
            "devices": _(0, at_least(0)),  # plan for this many devices (8 for a v5e-8 host, from a laptop); 0 = here
            # compile every device program for this accelerator type ahead of time (v5e-8, v5p-64, ...: s2d_jax/plan/aot.py)
            # and report XLA's figures beside the estimate; "" = the estimate only
            "topology": "",
        },
        # relegation (s2d_jax/relegation/routing.py): System 1 answers where it is confident, the rest escalate to System 2
        "route": {
            # none (no routed system: every input goes to System 2) | agreement (the share of `samples` System 1
            # samples that give their majority answer, as the filter votes) | logprob (the per-token probability of
            # System 1's greedy answer: exp of its mean token log-probability) | probe (a classifier on System 1's
            # hidden state at its answer, trained each round on whether its answers were System 2's:
            # s2d_jax/relegation/probe.py) | self (the distilled model learns to answer `marker` where System 2
            # would disagree with it, and routing follows the marker: s2d_jax/relegation/marker.py)
            "method": _("none", one_of("none", "agreement", "logprob", "probe", "self")),
            "marker": "<think>",  # self: what the model answers instead of an answer to ask for System 2
            "self_steps": _(100, at_least(1)),  # self: training steps on the marker targets after distillation
            "probe_layer": _(-1, at_least(-1)),  # probe: the residual stream it reads (0 = embeddings); -1 = by validation
            # probe, self: the share of the distillation examples (by id) kept out of training, to train the probe
            # on (self: to find where the distilled model is wrong; they are then trained on, marked there)
            "probe_holdout": _(0.2, between(0.0, 1.0, low_open=True, high_open=True)),
            "threshold": _(0.75, between(0.0, 1.0)),  # confident (System 1's answer stands) at confidence >= this
            "samples": _(4, at_least(2)),  # agreement: System 1 samples per input (their majority is its answer)
            "temperature": _(0.7, above(0.0)),  # agreement: those samples' temperature
            # eval's accuracy-against-cost sweep, from the same samples; () = 0, 0.05, ..., 0.9, finer to 0.999, 1
            "thresholds": (),
        },
        # rounds of relegation (s2d_jax/stages/loop.py): round r's System 1 is round r-1's distilled model
        "loop": {
            "rounds": _(1, at_least(1)),  # 1 = one distillation in the workdir itself; > 1: WORKDIR/rounds/R/
            # inputs per round: round r takes the stream's next round_size unlabelled inputs (the task's inputs in
            # order), and `loop.rounds` (with `task.n`) may grow on the workdir to go on as inputs arrive (rounds
            # in WORKDIR/rounds/R/ even for one); 0 = the pool is cut into `loop.rounds` equal slices
            "round_size": _(0, at_least(0)),
            "accumulate": True,  # train each round on every round's kept examples so far (else its own only)
            # base: each round trains from the base model (STaR's choice); previous: from the last distilled model
            "init": _("base", one_of("base", "previous")),
        },
        # System 2 from another model (e.g. an 8B teacher for a 1B student); "" path and preset = the model itself
        "teacher": {
            "path": "",  # as model.path: an HF directory, a .gguf, or a hub id
            "revision": "",
            "preset": "",  # a random preset (tests)
            "dtype": _("", one_of("", *DTYPES)),  # its weights' dtype; "" = model.compute_dtype (or model.dtype)
            "tokenizer": "",  # "" = the teacher's own; a path, hub id or "bytes"
        },
        # where metrics go besides the artifacts (s2d_jax/trackers.py); WORKDIR/tracking.jsonl always
        "report": {
            "trackers": _(("tensorboard",), each_of(*TRACKERS)),  # any of "tensorboard", "wandb"
            "wandb": {  # Weights & Biases, process 0 only; a resumed command continues the workdir's run
                "project": "s2d",
                "entity": "",  # "" = your default entity
                "name": "",  # "" = the workdir's name
                "group": "",
                "tags": (),
                # online (needs WANDB_API_KEY or `wandb login`) | offline (run files in WORKDIR/wandb, `wandb sync`
                # later) | disabled
                "mode": _("online", one_of("online", "offline", "disabled")),
            },
        },
        "eval": {
            "task": "",  # "" = task.name (e.g. distil on oasst2_judge, evaluate on mt_bench_judge)
            "path": "",  # held-out labelled inputs; "" = generate `n` with `seed` (synthetic tasks)
            "n": _(0, at_least(0)),
            "offset": _(0, at_least(0)),  # skip this many inputs of `path` first
            "seed": _(1, at_least(0)),  # a generator seed apart from task.seed, so the eval inputs are unseen
            "max_new_tokens": _(0, at_least(0)),  # System 1 answer budget (base and distilled); 0 = the task's own
            "samples": _(1, at_least(1)),  # System 2 samples per input: 1 = greedy; more = majority answer, and maj@k
            # robustness: the held-out inputs again under each named prompt perturbation (coin flip: see
            # CoinFlip.VARIANTS); accuracy per variant for every system
            "variants": (),
            # more routers swept on the held-out inputs beside route.method (any of "agreement", "logprob",
            # "probe", and "self" with route.method=self): their accuracy-vs-tokens curves share report.png, their
            # calibration and own cost the report's routers table (each costs one System 1 pass, agreement
            # route.samples of them)
            "routers": _((), each_of("agreement", "logprob", "probe", "self")),
            # lm-evaluation-harness (`s2d eval --harness TASKS`, s2d_jax/harness.py): its tasks on our models
            "harness": {
                "tasks": (),  # harness task names (stock, or in include_path's YAML files)
                # which models: system1 (the base, or the previous round's), distilled (model/), routed (the
                # distilled model, or the base, escalating to System 2 by route.method at route.threshold)
                "systems": _(("system1", "distilled"), each_of("system1", "distilled", "routed")),
                "limit": _(0, at_least(0)),  # at most this many documents per task; 0 = all
                "num_fewshot": _(-1, at_least(-1)),  # -1 = each task's own
                "chat_template": True,  # apply the model's chat template as the harness asks (few-shot as turns)
                "include_path": "",  # a directory of task YAML files (your own tasks)
            },
        },
    })
