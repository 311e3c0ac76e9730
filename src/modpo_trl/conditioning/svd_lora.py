"""The preference inside the adapter (after Panacea, arXiv 2402.02030): a LoRA whose per-objective singular values
are scaled by `w`.

Panacea writes each adapted weight as `W0 + U diag(sigma_1..sigma_k, s w_1, .., s w_n) V^T`: `k` shared, learned
singular values and one per objective, its preference weight times a learned per-layer scale `s`. Here a LoRA
adapter of rank `r = shared_rank + n * preference_rank` plays that role, with a gate on its rank-`r` bottleneck:

    delta_W(w) x = scaling * B diag(g(w)) A x,    g(w) = [1] * shared_rank + [w_1] * preference_rank + ... + [w_n] * ...

The learned singular values and Panacea's scale are absorbed into the columns of `B` (`B diag(sigma)` is just
another `B`), so the adapter is an ordinary peft LoRA folder (plus `preference_lora.json`, the layout); only the
gate is added, by a forward pre-hook on each `lora_B` that multiplies its input row by row. Every row of a batch can
carry its own `w` (a `(batch, n)` preference), which is how `MOCTrainer` trains on per-example preferences.

    model = load_preference_adapter(base_model, "outputs/quickstart-moc/moc")   # a PeftModel with gates
    with preference(model, [0.3, 0.7]):                                          # or apply_preference(model, w)
        model.generate(...)

A gated adapter refuses to run without a preference (no silent `w`). peft's merging (`merge_and_unload`,
`add_weighted_adapter`) does not know the gate: merge `fixed_preference_adapter(folder, w, out)`, the plain LoRA
adapter equal to the gated one at a fixed `w` (also what backends without hooks, such as vLLM, serve).
"""

from __future__ import annotations

import json
import weakref
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from .preference import check_preference

LAYOUT_FILE = "preference_lora.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class PreferenceLoRA:
    """The layout of a preference-gated LoRA: which of its `rank` bottleneck units are shared and which belong to
    which objective (in `objective_names` order, `preference_rank` units each, after the shared ones)."""

    objective_names: tuple[str, ...]
    shared_rank: int
    preference_rank: int

    def __post_init__(self):
        object.__setattr__(self, "objective_names", tuple(self.objective_names))
        if len(self.objective_names) < 2:
            raise ValueError(f"objective_names={list(self.objective_names)} must name at least 2 objectives")
        for name, minimum in (("shared_rank", 0), ("preference_rank", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")

    @classmethod
    def for_rank(
        cls, objective_names: Sequence[str], rank: int, preference_rank: int | None = None
    ) -> PreferenceLoRA:
        """The layout of a LoRA of total `rank`: `preference_rank` units per objective (None: `rank` split evenly
        between the objectives), the rest shared."""
        if preference_rank is None:
            preference_rank = rank // len(objective_names)
            if preference_rank == 0:
                raise ValueError(
                    f"a LoRA of rank r={rank} cannot give each of {len(objective_names)} objectives a unit; use "
                    f"r >= {len(objective_names)}"
                )
        shared = rank - len(objective_names) * preference_rank
        if shared < 0:
            raise ValueError(
                f"a LoRA of rank r={rank} cannot give {len(objective_names)} objectives preference_rank="
                f"{preference_rank} units each; use r >= {len(objective_names) * preference_rank} or a smaller "
                "preference_rank"
            )
        return cls(tuple(objective_names), shared, preference_rank)

    @property
    def rank(self) -> int:
        return self.shared_rank + len(self.objective_names) * self.preference_rank

    def gates(self, w: torch.Tensor) -> torch.Tensor:
        """`(..., n)` preferences -> `(..., rank)` gates `[1] * shared + [w_1] * preference_rank + ...`."""
        shared = torch.ones(*w.shape[:-1], self.shared_rank, dtype=w.dtype, device=w.device)
        return torch.cat([shared, w.repeat_interleave(self.preference_rank, dim=-1)], dim=-1)

    def save(self, folder: str | Path, prompt: bool = False) -> None:
        """Writes the layout next to the adapter; `prompt`: the model was also told `w` in its prompt (MOC's
        `conditioning="both"`), which `saved_conditioning` reports to whoever runs it."""
        data = {"format": "modpo_trl.preference_lora", "version": 1, **asdict(self), "prompt": prompt}
        data["objective_names"] = list(self.objective_names)
        (Path(folder) / LAYOUT_FILE).write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path) -> PreferenceLoRA | None:
        """The layout saved in an adapter folder, or `None` for an ordinary adapter."""
        path = Path(folder) / LAYOUT_FILE
        if not path.is_file():
            return None
        data = json.loads(path.read_text())
        try:
            return cls(tuple(data["objective_names"]), data["shared_rank"], data["preference_rank"])
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path} is not a preference LoRA layout: {e}") from None


def saved_conditioning(folder: str | Path) -> str:
    """How the model in an adapter folder was told its preference: `"adapter"`, `"both"` (gates and prompt), or
    `"prompt"` for an adapter without a preference layout."""
    path = Path(folder) / LAYOUT_FILE
    if not path.is_file():
        return "prompt"
    return "both" if json.loads(path.read_text()).get("prompt") else "adapter"


class _Gate:
    """The preference of one gated adapter, shared by the hooks on its `lora_B` modules."""

    def __init__(self, layout: PreferenceLoRA, adapter_name: str):
        self.layout, self.adapter_name = layout, adapter_name
        self.gates: torch.Tensor | None = None  # (rank,) or (batch, rank)

    def __call__(self, module: nn.Module, args: tuple) -> tuple:
        x, *rest = args
        gates = self.gates
        if gates is None:
            raise RuntimeError(
                f"the LoRA adapter {self.adapter_name!r} is conditioned on a preference over "
                f"{list(self.layout.objective_names)}: set one first with "
                "modpo_trl.conditioning.svd_lora.apply_preference(model, w) (or `with preference(model, w):`)"
            )
        if gates.dim() == 2:
            if gates.size(0) != x.size(0):
                raise ValueError(
                    f"the preference has {gates.size(0)} rows but the batch has {x.size(0)}: give one w per row, "
                    "or a single w for every row"
                )
            gates = gates.reshape(gates.size(0), *([1] * (x.dim() - 2)), gates.size(1))
        return (x * gates.to(dtype=x.dtype, device=x.device), *rest)


# lora_B module -> its gate. Weak keys: unloading an adapter or dropping the model drops its gates.
_GATES: weakref.WeakKeyDictionary[nn.Module, _Gate] = weakref.WeakKeyDictionary()


def attach(model: nn.Module, layout: PreferenceLoRA, adapter_name: str = "default") -> int:
    """Gates every LoRA layer of `adapter_name` in `model` by the preference; returns how many. Idempotent."""
    gate, count = _Gate(layout, adapter_name), 0
    for module in model.modules():
        lora_b = getattr(module, "lora_B", None)
        if not isinstance(lora_b, nn.ModuleDict) or adapter_name not in lora_b:
            continue
        target = lora_b[adapter_name]
        if not isinstance(target, nn.Linear):
            raise ValueError(
                f"{type(module).__name__} layers cannot be preference-conditioned (only LoRA on linear layers)"
            )
        if target.in_features != layout.rank:
            raise ValueError(
                f"the LoRA adapter {adapter_name!r} has rank {target.in_features}, but the preference layout "
                f"needs {layout.rank} (shared_rank={layout.shared_rank} + {len(layout.objective_names)} x "
                f"preference_rank={layout.preference_rank})"
            )
        if target in _GATES:  # already gated: keep its hook, take the new layout
            _GATES[target].layout = layout
        else:
            target.register_forward_pre_hook(gate)
            _GATES[target] = gate
        count += 1
    if count == 0:
        raise ValueError(f"the model has no LoRA layers of an adapter named {adapter_name!r} to condition")
    return count


def gated_adapters(model: nn.Module) -> dict[str, PreferenceLoRA]:
    """`{adapter name: layout}` of the preference-gated adapters in `model`."""
    return {g.adapter_name: g.layout for g in _gates(model)}


def _gates(model: nn.Module) -> list[_Gate]:
    found = {}
    for module in model.modules():
        gate = _GATES.get(module)
        if gate is not None:
            found[id(gate)] = gate
    return list(found.values())


def _as_gates(layout: PreferenceLoRA, w: Any) -> torch.Tensor:
    """Checked preference(s), one `(n,)` or one per row `(batch, n)` -> their gates."""
    n = len(layout.objective_names)
    values = torch.as_tensor(w, dtype=torch.float32).detach()  # stays on its device: the gates go there
    if values.dim() == 1:
        check_preference(values.tolist(), n)
    elif values.dim() == 2:
        for i, row in enumerate(values.tolist()):
            check_preference(row, n, f"preference[{i}]")
    else:
        raise ValueError(f"a preference must have shape ({n},) or (batch, {n}), got {tuple(values.shape)}")
    return layout.gates(values)


def apply_preference(model: nn.Module, w: Any, adapter_name: str | None = None) -> None:
    """Sets the preference of the gated adapter(s) of `model` (all of them, or `adapter_name`): `w` is one
    preference `(n,)` for every row, or one per row `(batch, n)`, in the adapter's `objective_names` order;
    `None` unsets it."""
    gates = [g for g in _gates(model) if adapter_name in (None, g.adapter_name)]
    if not gates:
        which = f" named {adapter_name!r}" if adapter_name else ""
        raise ValueError(
            f"the model has no preference-conditioned adapter{which} (load one with load_preference_adapter)"
        )
    for gate in gates:
        gate.gates = None if w is None else _as_gates(gate.layout, w)


@contextmanager
def preference(model: nn.Module, w: Any, adapter_name: str | None = None) -> Iterator[nn.Module]:
    """`apply_preference` for the duration of a `with` block; the previous preference is restored after it."""
    gates = [g for g in _gates(model) if adapter_name in (None, g.adapter_name)]
    previous = [g.gates for g in gates]
    apply_preference(model, w, adapter_name)
    try:
        yield model
    finally:
        for gate, gates_before in zip(gates, previous, strict=True):
            gate.gates = gates_before


def load_preference_adapter(model: nn.Module, folder: str | Path, adapter_name: str = "default") -> PeftModel:
    """Loads a saved preference-conditioned adapter onto `model` (a base model, or a `PeftModel` to add it to) and
    gates it; set `w` with `apply_preference` or `preference` before running it."""
    layout = PreferenceLoRA.load(folder)
    if layout is None:
        raise ValueError(f"{folder} has no {LAYOUT_FILE}: it is not a preference-conditioned adapter")
    if isinstance(model, PeftModel):
        model.load_adapter(str(folder), adapter_name=adapter_name)
    else:
        model = PeftModel.from_pretrained(model, str(folder), adapter_name=adapter_name)
    attach(model, layout, adapter_name)
    return model


def fixed_preference_adapter(folder: str | Path, w: Sequence[float], out: str | Path) -> Path:
    """Writes to `out` the ordinary LoRA adapter that equals the gated adapter in `folder` at the preference `w`
    (each column of every `lora_B` times its gate), for backends that cannot run the gate (vLLM) and for merging."""
    layout = PreferenceLoRA.load(folder)
    if layout is None:
        raise ValueError(f"{folder} has no {LAYOUT_FILE}: it is not a preference-conditioned adapter")
    gates = _as_gates(layout, list(w))
    weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
    scaled = {
        k: (v * gates.to(v.dtype)[None, :] if "lora_B" in k else v).contiguous() for k, v in weights.items()
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(scaled, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    (out / ADAPTER_CONFIG).write_text((Path(folder) / ADAPTER_CONFIG).read_text())
    return out


def is_lora(model: Any, peft_config: Any) -> bool:
    """Whether the policy is trained as a LoRA adapter (given as `peft_config`, or a LoRA `PeftModel`): what
    `conditioning="auto"` gates."""
    if peft_config is not None:
        return isinstance(peft_config, LoraConfig)
    return isinstance(model, PeftModel) and isinstance(model.peft_config[active_adapter(model)], LoraConfig)


def gated_lora_rank(model: Any, peft_config: Any, conditioning: str) -> int:
    """The rank of the LoRA adapter that adapter conditioning gates (from `peft_config`, or a `PeftModel`)."""
    config = peft_config
    if config is None and isinstance(model, PeftModel):
        config = model.peft_config[active_adapter(model)]
    if not isinstance(config, LoraConfig):
        raise ValueError(
            f"conditioning={conditioning!r} gates a LoRA adapter by the preference: pass peft_config=LoraConfig(...) "
            f"or a LoRA PeftModel (got peft_config={type(peft_config).__name__}, model={type(model).__name__}), or "
            "set conditioning='prompt' to tell a fully fine-tuned model w in its prompt"
        )
    if config.use_dora or config.rank_pattern:
        raise ValueError(
            f"conditioning={conditioning!r} needs one LoRA rank for every layer and no DoRA, got "
            f"use_dora={config.use_dora}, rank_pattern={config.rank_pattern}"
        )
    return config.r


def active_adapter(model: Any) -> str:
    adapter = getattr(model, "active_adapter", "default")
    return adapter if isinstance(adapter, str) else adapter[0]
