# /// script
# dependencies = [
#     "modpo_trl",
#     "trl",
#     "peft",
# ]
# ///

"""MODPO from the command line, in the shape of TRL's `trl/scripts/dpo.py`: the same arguments, plus the margin
rewards (`--margin_reward_funcs`, one `package.module:function` per entry of `--weights` after the first) and the
MODPO fields of `MODPOConfig`. With no margin reward and the default `--weights 1.0` it trains exactly as TRL's
DPO script. A reward function is TRL's (`fn(prompts, completions, **kwargs)`, as for GRPO) or `fn(prompts,
responses)`.

# Full training, with a length penalty as the margin (the MODPO paper's TL;DR setting)
```bash
python examples/modpo_trl_script.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --margin_reward_funcs modpo_trl.rewards.scorers:brevity \
    --weights 0.8 0.2 \
    --learning_rate 5.0e-7 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --eval_strategy steps \
    --eval_steps 50 \
    --output_dir Qwen2-0.5B-MODPO \
    --no_remove_unused_columns
```

# LoRA, streaming the data (margins are then scored per batch, inside the step)
```bash
python examples/modpo_trl_script.py \
    --dataset_name trl-lib/ultrafeedback_binarized \
    --dataset_streaming \
    --model_name_or_path Qwen/Qwen2-0.5B-Instruct \
    --margin_reward_funcs modpo_trl.rewards.scorers:brevity \
    --weights 0.8 0.2 \
    --learning_rate 5.0e-6 \
    --max_steps 1000 \
    --per_device_train_batch_size 2 \
    --gradient_accumulation_steps 8 \
    --output_dir Qwen2-0.5B-MODPO \
    --no_remove_unused_columns \
    --use_peft \
    --lora_r 32 \
    --lora_alpha 16
```
"""

from dataclasses import dataclass, field

import transformers
from datasets import load_dataset
from packaging.version import Version
from trl import ModelConfig, ScriptArguments, TrlParser, get_peft_config, get_quantization_config

from modpo_trl import MODPOConfig, MODPOTrainer
from modpo_trl.runs.rewards import import_object


@dataclass
class MODPOScriptArguments(ScriptArguments):
    """TRL's script arguments plus the margin rewards."""

    margin_reward_funcs: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Margin reward functions, 'package.module:function', one per entry of --weights after the "
            "first, in the same order."
        },
    )


def main(script_args: MODPOScriptArguments, training_args: MODPOConfig, model_args: ModelConfig) -> None:
    model_init_kwargs = dict(
        revision=model_args.model_revision,
        trust_remote_code=training_args.trust_remote_code,
        attn_implementation=model_args.attn_implementation,
        dtype=model_args.dtype,
    )
    if training_args.model_init_kwargs is not None:
        model_init_kwargs.update(training_args.model_init_kwargs)
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_dataset(
        script_args.dataset_name, name=script_args.dataset_config, streaming=script_args.dataset_streaming
    )
    margin_rewards = [
        import_object(spec, f"--margin_reward_funcs[{i}]")
        for i, spec in enumerate(script_args.margin_reward_funcs)
    ]
    trainer = MODPOTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=dataset[script_args.dataset_test_split] if training_args.eval_strategy != "no" else None,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
        margin_rewards=margin_rewards,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.accelerator.print("Training completed.")

    trainer.save_model(training_args.output_dir)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if Version(transformers.__version__) >= Version(
        "5.18.0"
    ):  # as TRL's script: finish trackers, process group
        trainer.end()


if __name__ == "__main__":
    parser = TrlParser((MODPOScriptArguments, MODPOConfig, ModelConfig))
    script_args, training_args, model_args = parser.parse_args_and_config()
    main(script_args, training_args, model_args)
