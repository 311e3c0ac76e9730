"""The dry run's peak-memory estimate against a hand computation for a tiny Llama config (nothing loaded)."""

from pathlib import Path

import pytest
import transformers
from transformers import LlamaConfig, T5Config

from modpo_trl.runs.engine import make_plan
from modpo_trl.runs.memory import estimate_memory, memory_lines, optimizer_bytes, policy_config
from modpo_trl.runs.methods import method_of
from modpo_trl.runs.recipe import load_recipe
from modpo_trl.train import main

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "tests" / "data" / "tiny_modpo.yaml"

# V=100, h=32, i=64, 2 layers, 4 heads of 8, 2 kv heads, untied, stored in bfloat16
V, H, FF, L, KV = 100, 32, 64, 2, 16
PER_LAYER_PARAMS = H * 32 + H * KV + H * KV + 32 * H + 3 * H * FF + 2 * H  # q k v o, gate up down, 2 norms
PARAMETERS = V * H + L * PER_LAYER_PARAMS + H + V * H  # embeddings, layers, final norm, lm_head
LINEAR = L * (PER_LAYER_PARAMS - 2 * H)  # the decoder's nn.Linear weights (not lm_head)
LORA = L * (4 * (H + 32) + 4 * (H + KV))  # r=4 on q_proj (32 -> 32) and v_proj (32 -> 16)
TOKENS = 4 * 2 * 64  # per_device_train_batch_size 4, chosen + rejected, max_length 64
PER_LAYER_VALUES = 4 * H + 2 * 32 + 2 * KV + 4 * FF  # norms in/out, q, k, v, attention out, 4 MLP values
LOGITS = V * (2 + 4)  # bf16 logits and their fp32 log-softmax


@pytest.fixture
def tiny_config(tmp_path):
    folder = tmp_path / "policy"
    LlamaConfig(
        vocab_size=V,
        hidden_size=H,
        intermediate_size=FF,
        num_hidden_layers=L,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
        dtype="bfloat16",
    ).save_pretrained(folder)
    return folder


def plan_for(folder, *overrides):
    recipe = load_recipe(
        TINY, [f"model.path={folder}", "model.dtype=auto", "objectives.1.reward.path=org/rm", *overrides]
    )
    args = make_plan(recipe, method_of(recipe), dry_run=True).runs[0].args
    return recipe, args, estimate_memory(recipe, args, policy_config(recipe))


def test_hand_computation_for_lora(tiny_config):
    assert (PARAMETERS, LINEAR, LORA) == (24992, 18432, 896)
    _, _, m = plan_for(tiny_config)
    assert (m.parameters, m.trainable, m.dtype) == (PARAMETERS, LORA, "bfloat16")
    assert m.weights == PARAMETERS * 2
    assert m.trainable_state == LORA * (4 + 4 + 8)  # fp32 weight and gradient, AdamW's two fp32 moments
    assert m.reference == 0  # LoRA's reference is the base with the adapter off
    assert m.activations == TOKENS * (L * PER_LAYER_VALUES * 2 + LOGITS) == 1_290_240
    assert m.activations_checkpointed == TOKENS * ((L * H + PER_LAYER_VALUES) * 2 + LOGITS) == 864_256
    assert not m.checkpointing and m.total == 49_984 + 14_336 + 1_290_240


def test_hand_computation_for_4_bit_and_full_fine_tuning(tiny_config):
    _, _, m = plan_for(tiny_config, "model.load_in_4bit=true", "training.activation_checkpointing=true")
    # 4-bit decoder linears with an 8-bit absmax per 64 weights (+ an fp32 scale per 256 absmax), the rest fp32
    assert m.weights == LINEAR * (0.5 + (1 + 4 / 256) / 64) + (PARAMETERS - LINEAR) * 4 == 35_748.5
    assert m.checkpointing and m.total == m.weights + m.trainable_state + m.activations_checkpointed
    _, _, m = plan_for(tiny_config, "lora.enabled=false", "training.precompute_ref_log_probs=false")
    assert m.trainable == PARAMETERS and m.trainable_state == PARAMETERS * (2 + 8)
    assert m.reference == m.weights  # DPO's frozen reference copy
    _, _, m = plan_for(tiny_config, "training.bf16=true", "model.dtype=float32")
    assert m.weights == PARAMETERS * 4 and m.activations == TOKENS * (L * PER_LAYER_VALUES * 2 + LOGITS)


OPTIMIZERS = [("adamw_torch", 8), ("adamw_torch_fused", 8), ("paged_adamw_8bit", 2), ("lion_32bit", 4)]
OPTIMIZERS += [("sgd", 0), ("adafactor", 0)]


@pytest.mark.parametrize("optim,state", OPTIMIZERS)
def test_optimizer_state_bytes(optim, state):
    assert optimizer_bytes(optim) == state


def test_the_dry_run_prints_the_estimate_without_loading_weights(tiny_config, monkeypatch, capsys):
    def no_weights(*args, **kwargs):
        raise AssertionError("weights were loaded")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_weights)
    args = [
        str(TINY),
        f"model.path={tiny_config}",
        "model.dtype=auto",
        "objectives.1.reward.path=org/rm",
        "--dry-run",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "# peak memory per process, estimated from the policy's config.json (nothing loaded):" in out
    assert "0.0M parameters, bfloat16" in out and "1.3 MB without" in out and "0.9 MB with activation" in out
    recipe, plan_args, _ = plan_for(tiny_config)
    assert memory_lines(recipe, plan_args)[-1].startswith("#   total")


def test_a_hub_id_not_in_the_local_cache_cannot_be_estimated(tiny_config):
    recipe, args, _ = plan_for(tiny_config)
    recipe.model.path = "org/not-downloaded"
    assert memory_lines(recipe, args) == [
        "# peak memory per process: cannot estimate: no config.json for model.path='org/not-downloaded' here "
        "(OSError); the dry run downloads nothing"
    ]


def test_an_architecture_it_cannot_read_is_said_not_raised(tiny_config, tmp_path):
    recipe, args, _ = plan_for(tiny_config)
    T5Config().save_pretrained(tmp_path / "t5")  # not a causal LM
    recipe.model.path = str(tmp_path / "t5")
    (line,) = memory_lines(recipe, args)
    assert line.startswith("# peak memory per process: cannot estimate for T5Config: ValueError: ")
