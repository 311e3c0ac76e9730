"""Hub-ready adapter folders: TRL's model card for the method with the run's weighting, objectives and recipe, the
training logs kept (trainer_state.json, TensorBoard), and `push_to_hub` to one repo per adapter, tested against
a fake Hub on 127.0.0.1 (the real client, its HTTP requests answered locally)."""

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import yaml
from huggingface_hub import ModelCard

from modpo_trl.runs import publish
from modpo_trl.runs.dpa import DPA
from modpo_trl.runs.engine import make_plan
from modpo_trl.runs.methods import method_of
from modpo_trl.runs.moc import MOC
from modpo_trl.runs.recipe import RecipeError, load_recipe
from modpo_trl.train import main

from ..helpers import PAIRS, TINY, save_tiny_models, tiny_overrides, train_recipe
from .test_dpa import tiny_recipe as tiny_dpa_recipe


@pytest.fixture(scope="module")
def saved_models(tmp_path_factory):
    return save_tiny_models(tmp_path_factory.mktemp("models"))


# ------------------------------------------------------------------------------------------------ the fake Hub
class FakeHub(BaseHTTPRequestHandler):
    """The Hub endpoints `create_repo` and `upload_folder` call; commits are kept as {repo: {path: bytes}}."""

    repos: dict
    created: list
    validated: list
    fail_commits = False

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        url = f"http://127.0.0.1:{self.server.server_port}"
        if self.path == "/api/validate-yaml":  # the client checks a README's metadata before committing it
            content = json.loads(body)["content"]
            metadata = yaml.safe_load(content.split("---")[1]) or {}
            base = metadata.get("base_model")
            if base is not None and not re.fullmatch(r"[\w.-]+(/[\w.-]+)?", base):  # the Hub links it
                return self._reply(400, {"errors": [{"message": f"base_model {base!r} is not a model id"}]})
            self.validated.append(metadata)
            return self._reply(200, {"errors": [], "warnings": []})
        if self.path == "/api/repos/create":
            request = json.loads(body)
            repo = f"{request.get('organization') or 'tester'}/{request['name']}"
            self.created.append({"repo": repo, "visibility": request.get("visibility")})
            return self._reply(200, {"url": f"{url}/{repo}", "name": repo})
        repo, _, rest = self.path.removeprefix("/api/models/").partition("/")
        repo = f"{repo}/{rest.split('/')[0]}"
        if "/preupload/" in self.path:
            files = json.loads(body)["files"]
            return self._reply(
                200,
                {
                    "files": [
                        {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                    ]
                },
            )
        if "/commit/" in self.path:
            if self.fail_commits:
                return self._reply(
                    403, {"error": "no write access to this repo"}
                )  # a 5xx would be retried with backoff
            lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
            files = self.repos.setdefault(repo, {})
            for line in lines:
                if line["key"] == "file":
                    files[line["value"]["path"]] = base64.b64decode(line["value"]["content"])
            return self._reply(200, {"commitUrl": f"{url}/{repo}/commit/{'a' * 40}", "commitOid": "a" * 40})
        return self._reply(404, {"error": f"unexpected {self.path}"})

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_hub(monkeypatch):
    handler = type("Hub", (FakeHub,), {"repos": {}, "created": [], "validated": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    yield handler
    server.shutdown()


# ------------------------------------------------------------------------------------------------ tests
def test_a_finished_adapter_folder_is_hub_ready(saved_models, tmp_path):
    recipe = load_recipe(
        TINY, tiny_overrides(saved_models, tmp_path, "sweep.index=1", "training.report_to=tensorboard")
    )
    train_recipe(recipe)
    folder = tmp_path / "tiny" / "w-0.67-0.33"
    assert not (tmp_path / "tiny" / ".w-0.67-0.33.tmp").exists()
    # the log history, and TensorBoard's default folder, moved out of the deleted work folder
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "loss" in e] == [1, 2]
    assert list((folder / "runs").glob("*/events.out.tfevents.*"))
    # TRL's card for MODPO, with peft's adapter metadata; no link to the local base model
    card = ModelCard.load(folder / "README.md")
    assert card.data.library_name == "peft" and card.data.pipeline_tag == "text-generation"
    assert {"trl", "modpo", "modpo_trl", "lora", "generated_from_trainer"} <= set(card.data.tags)
    assert card.data.base_model is None and not any(t.startswith("base_model:") for t in card.data.tags)
    assert "This model was trained with MODPO, a method introduced in [Beyond One-Preference" in card.text
    assert "@inproceedings{zhou2024beyond" in card.text and "[More Information Needed]" not in card.text
    assert f"fine-tuned version of `{saved_models / 'policy'}`" in card.text
    assert f'model="{folder}"' in card.text  # the quick start loads the adapter folder
    assert "| helpful | 0.666667 | target; pairs from" in card.text
    assert f"| harmless | 0.333333 | reward model reward `{saved_models / 'rm'}` |" in card.text
    excerpt = yaml.safe_load(card.text.split("```yaml\n")[-1].split("```")[0])
    assert excerpt == publish.recipe_excerpt(recipe, make_plan(recipe, method_of(recipe)).runs[1])
    assert excerpt["weights"] == pytest.approx([2 / 3, 1 / 3]) and excerpt["lora"]["r"] == 4


def test_the_recipe_excerpt_never_holds_the_hub_token(saved_models, tmp_path):
    recipe = load_recipe(TINY, tiny_overrides(saved_models, tmp_path, "training.hub_token=hf_secret"))
    run = make_plan(recipe, method_of(recipe), dry_run=True).runs[0]
    excerpt = publish.recipe_excerpt(recipe, run)
    assert "hub_token" not in excerpt["training"] and "hf_secret" not in json.dumps(excerpt)


def test_push_to_hub_pushes_each_weighting_to_its_own_repo(saved_models, tmp_path, fake_hub):
    overrides = tiny_overrides(
        saved_models,
        tmp_path,
        "sweep.weights=[[1.0, 0.0], [0.5, 0.5]]",
        "training.push_to_hub=true",
        "training.hub_model_id=me/tiny",
        "training.hub_private_repo=true",
    )
    assert main([str(TINY), *overrides]) == 0
    repos = {"me/tiny-w-1.00-0.00", "me/tiny-w-0.50-0.50"}
    assert {c["repo"] for c in fake_hub.created} == repos and all(
        c["visibility"] == "private" for c in fake_hub.created
    )
    assert set(fake_hub.repos) == repos and len(fake_hub.validated) == 2
    for repo in repos:
        files = fake_hub.repos[repo]
        assert {"README.md", "adapter_config.json", "adapter_model.safetensors", "trainer_state.json"} <= set(
            files
        )
        assert not any(name.startswith(".") for name in files)  # the folder, not the work folder
        assert f'model="{repo}"' in files["README.md"].decode()  # the quick start loads the repo
    tag = "w-0.50-0.50"
    local = tmp_path / "tiny" / tag
    assert (
        fake_hub.repos[f"me/{'tiny-' + tag}"]["adapter_model.safetensors"]
        == (local / "adapter_model.safetensors").read_bytes()
    )
    entry = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["runs"][tag]
    assert entry["status"] == "done" and entry["metrics"]["hub"]["repo_id"] == f"me/tiny-{tag}"
    assert entry["metrics"]["hub"]["commit"] == "a" * 40


def test_a_failed_push_is_reported_and_the_adapter_kept(saved_models, tmp_path, fake_hub, capsys):
    fake_hub.fail_commits = True
    overrides = tiny_overrides(saved_models, tmp_path, "sweep.index=0", "training.push_to_hub=true")
    assert main([str(TINY), *overrides]) == 0
    err = capsys.readouterr().err
    folder = tmp_path / "tiny" / "w-1.00-0.00"
    assert f"pushing {folder} to the Hub repo 'tiny-w-1.00-0.00' failed" in err
    assert f"`hf upload tiny-w-1.00-0.00 {folder}`" in err
    entry = json.loads((tmp_path / "tiny" / "manifest.json").read_text())["runs"]["w-1.00-0.00"]
    assert entry["status"] == "done" and (folder / "adapter_model.safetensors").is_file()
    assert entry["metrics"]["hub"]["error"].startswith("HfHubHTTPError")


PUSH_PROBLEMS = [  # (overrides, environment, message)
    (
        ["training.hub_model_id=me/bad name"],
        {},
        r"training.hub_model_id: the Hub repo id 'me/bad name-w-1.00-0.00'",
    ),
    (["run_name=tiny.."], {}, r"run_name: the Hub repo id 'tiny..-w-1.00-0.00' is not valid"),
    ([], {"offline": True}, r"push_to_hub=true, but HF_HUB_OFFLINE is set"),
    ([], {"token": None}, r"push_to_hub=true needs a Hugging Face token"),
]


@pytest.mark.parametrize(
    "overrides,env,message", PUSH_PROBLEMS, ids=["repo id", "run_name", "offline", "token"]
)
def test_push_problems_are_found_before_training(
    overrides, env, message, saved_models, tmp_path, monkeypatch
):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", env.get("offline", False))
    monkeypatch.setenv("HF_TOKEN", "hf_fake_token")
    if "token" in env:
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(publish, "get_token", lambda: None)
    recipe = load_recipe(
        TINY, tiny_overrides(saved_models, tmp_path, "training.push_to_hub=true", *overrides)
    )
    with pytest.raises(RecipeError, match=message):
        make_plan(recipe, method_of(recipe), dry_run=True)


def test_conditioned_methods_cards_say_how_to_condition_prompts(saved_models, tmp_path):
    recipe = load_recipe(
        TINY, tiny_overrides(saved_models, tmp_path, "method=moc", f"objectives.1.data={{path: {PAIRS}}}")
    )
    run = make_plan(recipe, MOC(), dry_run=True).runs[0]
    folder = tmp_path / "moc"
    folder.mkdir()
    publish.write_model_card(folder, recipe, MOC(), run, "me/tiny-moc")
    card = ModelCard.load(folder / "README.md")
    assert {"moc", "modpo_trl"} <= set(card.data.tags) and "One Model for All" in card.text
    assert "| helpful | conditioned |" in card.text
    assert "condition_prompt(prompt, w=[0.5, 0.5], objective_names=['helpful', 'harmless'])" in card.text


def test_dpa_keeps_each_iterations_logs_and_gets_its_card(tmp_path, tokenizer):
    recipe = tiny_dpa_recipe(tmp_path, tokenizer, report_to="tensorboard")
    train_recipe(recipe)
    folder = recipe.run_dir / "dpa"
    iteration = folder / "iterations" / "iter-1"
    assert json.loads((iteration / "trainer_state.json").read_text())["log_history"]
    assert list((iteration / "runs").glob("*/events.out.tfevents.*"))
    assert not (folder / "trainer_state.json").exists()  # the last iteration's log is under iterations/ only
    card = ModelCard.load(folder / "README.md")
    assert "dpa" in card.data.tags and "Directional Preference Alignment" in card.text
    assert "from modpo_trl.conditioning.directions import condition_prompt" in card.text
    assert isinstance(method_of(recipe), DPA)
