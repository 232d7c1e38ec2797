"""DPO with TRL as a user would write it: LoRA, DPOTrainer (the adapter-free model as the reference), train,
save.

    python bench/trl_scripts/dpo.py MODEL_DIR pairs.jsonl OUT_DIR --batch-size 8 --lr 5e-5

The pairs are {"prompt", "chosen", "rejected"} text, the prompt already rendered with the chat template
and each answer ending with `<|im_end|>` (bench/harness.py), so TRL and Tunery score the same tokens.
bench/whole_process.py times this script from process start to exit beside `tunery train dpo`.
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed
from trl import DPOConfig, DPOTrainer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=5e-5)
parser.add_argument("--beta", type=float, default=0.1)
parser.add_argument("--max-length", type=int, default=1024)
parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster")
args = parser.parse_args()

set_seed(args.seed)  # a reproducible run: whatever is drawn from here on (LoRA, data order)
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = "<|endoftext|>"  # SmolLM2 pads with its end-of-turn token; a distinct one, as Tunery
model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
dataset = load_dataset("json", data_files=args.data, split="train")

config = DPOConfig(
    output_dir=args.out,
    num_train_epochs=1,
    per_device_train_batch_size=args.batch_size,
    learning_rate=args.lr,
    lr_scheduler_type="constant",
    beta=args.beta,
    max_length=args.max_length,
    bf16=args.precision == "bf16",
    use_cpu=True,
    gradient_checkpointing=args.gradient_checkpointing,
    logging_steps=1,
    save_strategy="no",
    seed=args.seed,
    train_sampling_strategy="sequential",  # the file lists the pairs in Tunery's order: the same batches
)
trainer = DPOTrainer(
    model=model,
    args=config,
    train_dataset=dataset,
    processing_class=tokenizer,
    peft_config=LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    ),
)
trainer.train()
trainer.save_model()
