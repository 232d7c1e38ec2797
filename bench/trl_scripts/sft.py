"""Supervised fine-tuning with TRL as a user would write it: LoRA, SFTTrainer, train, save.

    python bench/trl_scripts/sft.py MODEL_DIR train.jsonl OUT_DIR --batch-size 8 --lr 2e-4

The data is TRL's conversational prompt-completion format ({"prompt": [...], "completion": [...]}), so
the loss covers the completion only. bench/whole_process.py times this script from process start to
exit beside `tunery train sft` on the same examples.

    python bench/trl_scripts/sft.py ... --quantize int4 --max-steps 20     # QLoRA, as TRL's docs have it

`--quantize int8|int4` loads the base with bitsandbytes (LLM.int8 with its default outlier threshold, or
4-bit NF4 with double quantization computing in the training precision, as the QLoRA paper has it) under
the LoRA adapter: QLoRA as TRL users write it. bench/scale.py runs it beside
`tunery train sft --quantize`.
"""

import argparse

import torch
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, set_seed
from trl import SFTConfig, SFTTrainer

parser = argparse.ArgumentParser()
parser.add_argument("model")
parser.add_argument("data")
parser.add_argument("out")
parser.add_argument("--batch-size", type=int, default=8)
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--max-length", type=int, default=1024)
parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--gradient-checkpointing", action="store_true", help="TRL's default; off is faster")
parser.add_argument("--quantize", choices=["none", "int8", "int4"], default="none")
parser.add_argument("--max-steps", type=int, default=-1, help="stop after N steps (default: one epoch)")
args = parser.parse_args()

set_seed(args.seed)  # a reproducible run: whatever is drawn from here on (LoRA, data order)
tokenizer = AutoTokenizer.from_pretrained(args.model)
tokenizer.pad_token = "<|endoftext|>"  # SmolLM2 pads with its end-of-turn token; a distinct one, as Tunery
dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
quantization = {
    "none": None,
    "int8": BitsAndBytesConfig(load_in_8bit=True),
    "int4": BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=dtype,
    ),
}[args.quantize]
model = AutoModelForCausalLM.from_pretrained(
    args.model,
    dtype=torch.float32,
    quantization_config=quantization,
    device_map="cpu" if quantization else None,
)
dataset = load_dataset("json", data_files=args.data, split="train")

config = SFTConfig(
    output_dir=args.out,
    num_train_epochs=1,
    max_steps=args.max_steps,
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
    train_sampling_strategy="sequential",  # the file lists the examples in Tunery's order: the same batches
)
trainer = SFTTrainer(
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
