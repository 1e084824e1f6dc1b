"""TRL's SFT per-token losses on chat examples, in a process of its own (`tests/test_sft_parity.py` runs it): TRL
imports `datasets`, which loads pyarrow, whose bundled native libraries must not share a process with jaxlib (a
test worker that had loaded them aborted inside XLA's compilation-cache write).

    python tests/trl_reference.py CHECKPOINT_DIR CHATS_JSON OUT_JSON
"""

import json
import sys
import tempfile


def main(path: str, chats_path: str, out_path: str) -> None:
    import torch
    import transformers
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    with open(chats_path) as f:
        chats = json.load(f)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = [{"prompt": [{"role": "user", "content": p}], "completion": [{"role": "assistant", "content": t}]}
            for p, t in chats]
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, completion_only_loss=True, packing=False, report_to="none",
                         per_device_train_batch_size=len(rows), use_cpu=True, dataset_num_proc=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok)
        batch = trainer.data_collator([trainer.train_dataset[i] for i in range(len(rows))])
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    logp = torch.log_softmax(logits[:, :-1], -1)
    labels = batch["labels"][:, 1:]
    out = []
    for r in range(len(rows)):
        keep = labels[r] != -100
        out.append({"losses": (-logp[r][keep].gather(-1, labels[r][keep][:, None])[:, 0]).tolist(),
                    "labelled": tok.decode(labels[r][keep])})
    with open(out_path, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
