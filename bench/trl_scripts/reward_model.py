"""A reward model with TRL as a user would write it: a one-label sequence classifier, LoRA (the score head
trained in full), RewardTrainer, train, save.

    python bench/trl_scripts/reward_model.py MODEL_DIR pairs.jsonl OUT_DIR --batch-size 8 --lr 1e-4

The pairs are {"chosen", "rejected"} text, prompt and answer rendered with the chat template, each answer
ending with `<|im_end|>`, the token both trainers read the score at (bench/harness.py).
bench/whole_process.py times this script from process start to exit beside `tunery train rm`.
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForSequenceClassification, AutoTokenizer, set_seed
from trl import RewardConfig, RewardTrainer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--max-length", type=int, default=1024)
parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster")
args = parser.parse_args()

set_seed(args.seed)  # a reproducible run: the score head is drawn as the model loads
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = "<|endoftext|>"  # SmolLM2 pads with its end-of-turn token; a distinct one, as Tunery
model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=1, dtype=torch.float32)
model.config.pad_token_id = tokenizer.pad_token_id
dataset = load_dataset("json", data_files=args.data, split="train")

config = RewardConfig(
    output_dir=args.out,
    num_train_epochs=1,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr,
    lr_scheduler_type="constant",
    max_length=args.max_length,
    bf16=args.precision == "bf16",
    use_cpu=True,
    gradient_checkpointing=args.gradient_checkpointing,
    logging_steps=1,
    save_strategy="no",
    seed=args.seed,
    train_sampling_strategy="sequential",  # the file lists the pairs in Tunery's order: the same batches
)
trainer = RewardTrainer(
    model=model,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
    # task_type SEQ_CLS: peft trains the `score` head in full beside the LoRA weights
    peft_config=LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="SEQ_CLS"
    ),
)
trainer.train()
trainer.save_model()
