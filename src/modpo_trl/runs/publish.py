"""Hub-ready adapter folders.

Each finished adapter folder (`<run_dir>/<tag>/`) gets, before the engine gives it its final name:
- TRL's model card for its method (`generate_model_card` with the trainer's `_name`, `_paper` and `_tag_names`:
  paper, citation, tags) with peft's adapter metadata, plus the weighting, objectives, base model and the
  recipe excerpt that made it;
- its training logs, copied from the run's work folder (which the engine then deletes): `trainer_state.json` (the
  log history), TensorBoard's `runs/` and CodeCarbon's `emissions.csv` (`modpo_trl.trainers.logs`);
- with `training.push_to_hub: true`, a push to its own Hub repo `<hub_model_id>-<tag>` (`hub_model_id` defaults
  to the recipe's `run_name`, in the token's namespace). One repo per adapter, rather than one repo with a folder
  per weighting, so that each loads by its id alone (`PeftModel.from_pretrained(repo)`, `pipeline(model=repo)`).
  The Trainer itself never pushes (`runs.method.trainer_config`): it would push its temporary work folder.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
import yaml
from huggingface_hub import HfApi, ModelCard, get_token
from huggingface_hub import constants as hub_constants
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.integrations import (
    INTEGRATION_TO_CALLBACK,
    get_available_reporting_integrations,
    is_flytekit_available,
)
from trl.trainer.utils import generate_model_card, get_comet_experiment_url, get_trackio_space_url

from ..trainers.logs import keep_logs
from .method import Method, Run, Trained
from .models import HUB_ID
from .recipe import TRAINED_SECTIONS, DataConfig, Recipe, RecipeError, RewardConfig, as_dict

# The Trainer's hub strategies that promise uploads of checkpoints, which the engine does not make.
CHECKPOINT_STRATEGIES = ("checkpoint", "all_checkpoints")


def hub_repo_id(recipe: Recipe, tag: str) -> str:
    """`<hub_model_id>-<tag>`, e.g. `me/safety-modpo-w-0.30-0.70`."""
    return f"{recipe.training.get('hub_model_id') or recipe.run_name}-{tag}"


def check_outputs(recipe: Recipe, runs: list[Run]) -> None:
    """Where the runs' outputs go, checked before training: the `report_to` integrations, and the Hub push."""
    for report_to in {tuple(getattr(run.args, "report_to", None) or ()) for run in runs}:
        check_report_to(list(report_to))
    check_publishing(recipe, [run.tag for run in runs])


def check_report_to(report_to: list[str]) -> None:
    """The `report_to` integrations exist and are installed, as `Trainer` requires when it starts."""
    available = get_available_reporting_integrations()
    if is_flytekit_available():  # the one integration transformers' list leaves out
        available.append("flyte")
    for name in report_to:
        if name not in INTEGRATION_TO_CALLBACK:
            valid = ["all", "none", *sorted(INTEGRATION_TO_CALLBACK)]
            raise RecipeError(f"training.report_to={name!r} is not valid; valid: {valid}")
        if name not in available:
            raise RecipeError(
                f"training.report_to={name!r}: its package is not installed here (installed integrations: "
                f"{available or 'none'}); install it (e.g. `pip install {name}`) or choose another"
            )


def check_publishing(recipe: Recipe, tags: list[str]) -> None:
    """With `training.push_to_hub: true`, what would make the pushes fail after training is found now: offline
    mode, no token, a repo id the Hub rejects, a checkpoint hub strategy."""
    training = recipe.training
    if not training.get("push_to_hub"):
        return
    if hub_constants.HF_HUB_OFFLINE:
        raise RecipeError(
            "training.push_to_hub=true, but HF_HUB_OFFLINE is set: nothing can be pushed; unset it or set "
            "training.push_to_hub=false (the adapters stay in the run directory)"
        )
    if not (training.get("hub_token") or get_token()):
        raise RecipeError(
            "training.push_to_hub=true needs a Hugging Face token with write access: `hf auth login`, or HF_TOKEN"
        )
    strategy = training.get("hub_strategy")
    if strategy in CHECKPOINT_STRATEGIES:
        raise RecipeError(
            f"training.hub_strategy={strategy!r} is not supported: each finished adapter is pushed once, to its "
            "own repo; valid: ['every_save', 'end']"
        )
    for tag in tags:
        try:
            validate_repo_id(hub_repo_id(recipe, tag))
        except HFValidationError as e:
            key = "training.hub_model_id" if training.get("hub_model_id") else "run_name"
            raise RecipeError(
                f"{key}: the Hub repo id {hub_repo_id(recipe, tag)!r} is not valid: {e}"
            ) from None


def finish_adapter(folder: Path, recipe: Recipe, method: Method, run: Run, trained: Trained) -> None:
    """Makes the complete adapter `folder` Hub-ready (main process; the engine calls it before giving the folder
    its final name): logs, model card, and the push when the recipe asks for it, whose outcome goes into
    `trained.metrics["hub"]` (and so into the manifest)."""
    keep_logs(run.work_dir, folder)
    redact_training_args(folder / "training_args.bin", recipe)
    pushing = bool(recipe.training.get("push_to_hub"))
    repo_id = hub_repo_id(recipe, run.tag) if pushing else None
    write_model_card(folder, recipe, method, run, repo_id)
    if repo_id is not None:
        trained.metrics["hub"] = push(folder, recipe, repo_id, recipe.run_dir / run.tag)


def redact_training_args(path: Path, recipe: Recipe) -> None:
    """The trainer config pickled by `Trainer.save_model` (`training_args.bin`), with the `training` values read
    from the environment (e.g. `hub_token: ${oc.env:HF_TOKEN}`) as their `${oc.env:...}` text."""
    keys = {
        k[9:]: v
        for k, v in recipe.from_environment.items()
        if k.startswith("training.") and k.count(".") == 1
    }
    if not keys or not path.is_file():
        return
    args = torch.load(path, weights_only=False)  # written by this process's trainer a moment ago
    for key, text in keys.items():
        setattr(args, key, text)
    torch.save(args, path)


def write_model_card(folder: Path, recipe: Recipe, method: Method, run: Run, repo_id: str | None) -> None:
    """`folder/README.md`: TRL's card for the method, with peft's adapter metadata (library, tags) from the card
    peft saved there, and a section on the run (`run_section`)."""
    trainer = method.trainer_class
    paper = getattr(trainer, "_paper", {})
    base = recipe.model.path
    data = recipe.objectives[recipe.target_index].data if method.has_target else None
    card = generate_model_card(
        base_model=base,
        model_name=(repo_id or f"{recipe.run_name}-{run.tag}").split("/")[-1],
        hub_model_id=repo_id or str(recipe.run_dir / run.tag),
        dataset_name=data.path if data is not None and is_hub_id(data.path) else None,
        tags=list(getattr(trainer, "_tag_names", [])),
        wandb_url=None,
        trackio_url=get_trackio_space_url(),
        comet_url=get_comet_experiment_url(),
        trainer_name=getattr(trainer, "_name", method.name.upper()),
        trainer_citation=paper.get("citation"),
        paper_title=paper.get("title"),
        paper_id=paper.get("id"),
    )
    tags = set(card.data.tags or [])
    saved = folder / "README.md"
    if saved.is_file():  # peft's card: what makes the repo an adapter of the base model on the Hub
        adapter = ModelCard.load(saved).data
        card.data.library_name = adapter.library_name or card.data.library_name
        card.data.pipeline_tag = adapter.pipeline_tag or card.data.pipeline_tag
        tags |= set(adapter.tags or [])
    if not is_hub_id(base):  # a local folder is no Hub model: no metadata link to it, and no link in the text
        card.data.base_model = None
        tags = {t for t in tags if not t.startswith("base_model:")}
        card.text = card.text.replace(f"[{base}](https://huggingface.co/{base})", f"`{base}`")
    card.data.tags = sorted(tags)
    card.text = card.text.rstrip() + "\n\n" + run_section(recipe, method, run) + "\n"
    card.save(saved)


def run_section(recipe: Recipe, method: Method, run: Run) -> str:
    """The card's account of the run: weighting, objectives, base model, usage and the recipe excerpt."""
    lines = [
        "## Multi-objective training",
        "",
        f"Trained with modpo_trl (`method: {recipe.method}`): run `{recipe.run_name}`, adapter `{run.tag}`.",
        "",
        "| objective | weight | trained on |",
        "| --- | --- | --- |",
    ]
    target = recipe.target_index if method.has_target else None
    for i, objective in enumerate(recipe.objectives):
        weight = "conditioned" if run.weights is None else f"{run.weights[i]:g}"
        role = ["target"] if i == target else []
        role += [_describe_data(objective.data)] if objective.data is not None else []
        role += [_describe_reward(objective.reward)] if objective.reward is not None else []
        lines.append(f"| {objective.name} | {weight} | {'; '.join(role)} |")
    lines += ["", f"Base model: {_describe_model(recipe)}."]
    notes = method.card_notes(recipe, run)
    if notes:
        lines += ["", *notes]
    excerpt = recipe_excerpt(recipe, run)
    lines += ["", "### Recipe", "", "```yaml", yaml.safe_dump(excerpt, sort_keys=False).rstrip(), "```"]
    return "\n".join(lines)


def recipe_excerpt(recipe: Recipe, run: Run) -> dict[str, Any]:
    """The sections of the resolved recipe that decide the adapter, with this run's weighting; no token."""
    resolved = as_dict(recipe)
    excerpt = {"run_name": recipe.run_name, **{k: resolved[k] for k in TRAINED_SECTIONS}}
    excerpt["training"] = {k: v for k, v in excerpt["training"].items() if k != "hub_token"}
    if run.weights is not None:
        excerpt["weights"] = run.weights
    return excerpt


def push(folder: Path, recipe: Recipe, repo_id: str, final: Path) -> dict[str, Any]:
    """Uploads `folder` to `repo_id` (created if needed, on branch `training.hub_revision` if set). A failed push
    is reported, not raised: the adapter is complete and kept at `final`, and can be pushed again by hand."""
    training = recipe.training
    revision = training.get("hub_revision")
    api = HfApi(token=training.get("hub_token"))
    try:
        repo = api.create_repo(repo_id, private=training.get("hub_private_repo"), exist_ok=True)
        if revision:
            api.create_branch(repo.repo_id, branch=revision, exist_ok=True)
        commit = api.upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            revision=revision,
            commit_message=f"modpo_trl: {recipe.method} adapter {final.name} of run {recipe.run_name}",
        )
    except Exception as e:  # network, authentication, quota, ...: whichever it is, training's result is kept
        retry = f"hf upload {repo_id} {final}" + (f" --revision {revision}" if revision else "")
        print(
            f"modpo_trl.train: WARNING: pushing {final} to the Hub repo {repo_id!r} failed ({type(e).__name__}: "
            f"{' '.join(str(e).split())}); the adapter is kept. Push it again with `{retry}`",
            file=sys.stderr,
            flush=True,
        )
        return {"repo_id": repo_id, "error": f"{type(e).__name__}: {e}"}
    return {"repo_id": repo.repo_id, "commit": commit.oid, "url": commit.commit_url}


def is_hub_id(path: str) -> bool:
    """A hub id (`org/name`) rather than a local path: what the Hub accepts as `base_model` / dataset metadata."""
    return bool(HUB_ID.fullmatch(path)) and not Path(path).expanduser().exists()


def _describe_data(data: DataConfig) -> str:
    return f"pairs from `{data.path}` ({data.format})"


def _describe_reward(reward: RewardConfig) -> str:
    source = reward.path or reward.function or f"{reward.chosen_column} / {reward.rejected_column}"
    return f"{reward.type.replace('_', ' ')} reward `{source}`"


def _describe_model(recipe: Recipe) -> str:
    model, lora = recipe.model, recipe.lora
    parts = [f"`{model.path}`"]
    if model.revision:
        parts.append(f"revision `{model.revision}`")
    parts.append(f"dtype {model.dtype}")
    if model.load_in_4bit:
        parts.append(f"4-bit {model.bnb_4bit_quant_type} (QLoRA)")
    if model.load_in_8bit:
        parts.append("8-bit")
    if lora.enabled:
        kind = "DoRA" if lora.use_dora else "LoRA"
        parts.append(
            f"{kind} r={lora.r}, alpha={lora.alpha}" + (", rsLoRA scaling" if lora.use_rslora else "")
        )
    return ", ".join(parts)
