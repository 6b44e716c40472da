"""`cai export`: run folder -> TRL-ready DatasetDict, dataset card, local files, (fake) Hub push."""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import datasets
import pytest
import typer
import yaml

from cai import export as ex
from cai.cli import main
from cai.cli.app import app
from cai.constitution import load_constitution
from cai.errors import CaiError, InputError

TOKEN = "hf_FAKEtoken0123456789abcdefghij"
MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"


def _w(path: Path, rows: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    path.write_text(text, encoding="utf-8")


def make_run(folder: Path, prompts: int = 12, pairs_per_prompt: int = 2, *, manifest: bool = True,
             sft: bool = True, prefs: bool = True) -> Path:
    """A small valid run folder, shaped as cai revise / cai label / cai run write it."""
    folder.mkdir(parents=True, exist_ok=True)
    const = load_constitution()
    ids = [p.id for p in const.principles]
    base = {"cai_version": "0.1.0", "model": MODEL, "constitution": const.name,
            "constitution_version": const.version, "constitution_hash": const.digest(),
            "templates_hash": "t" * 64}
    judge = {"mode": "cot", "principles": 2, "both_orders": True, "seed": 0, "top_logprobs": 20,
             "min_mass": 0.0, "clamp": [0.4, 0.6], "tie_threshold": 0.05, "fallback": True,
             "cot": {"max_tokens": 256}}
    rev_cfg = {"rounds": 2, "seed": 0, "generate": {"max_tokens": 64, "temperature": 0.0}}
    revs, labels, pref_rows = [], [], []
    for i in range(prompts):
        prompt = [{"role": "user", "content": f"Question {i}: how do I get back at them? é"}]
        ini, final = f"Answer {i}: slash their tyres.", f"Answer {i}: talk to them calmly."
        revs.append({
            "id": f"r{i}", "prompt": prompt,
            "messages": [*prompt, {"role": "assistant", "content": final}],
            "initial_response": ini, "revised_response": final, "principle_ids": ids[:2],
            "rounds": [{"round": k + 1, "principle_id": ids[k], "critique_request": "c",
                        "critique": "harmful", "revision_request": "r", "revision": final}
                       for k in range(2)],
            "calls": [{"step": "initial", "finish_reason": "stop", "prompt_tokens": 9,
                       "completion_tokens": 7}],
            "source": f"prompts.jsonl:{i + 1}", "extra": {"k": i} if i % 2 else {"other": "x"},
            "provenance": {**base, "stage": "revise", "config": rev_cfg},
        })
        for j in range(pairs_per_prompt):
            p = 0.9 - 0.1 * j
            judgements = [{"principle_id": ids[0], "order": o, "mode": "cot", "p_a": p,
                           "p_b": 1 - p, "abstain": None, "text": "A is kinder"}
                          for o in ("ab", "ba")]
            label = {"id": f"p{i}-{j}", "prompt": prompt, "response_a": final, "response_b": ini,
                     "p_a": p, "tie": False, "label": "a", "human": "a" if j == 0 else "b",
                     "abstentions": 1 if j else 0, "judgements": judgements,
                     "position_consistent": j == 0, "label_mode": "cot"}
            labels.append(label)
            pref_rows.append({
                "id": label["id"], "prompt": prompt,
                "chosen": [{"role": "assistant", "content": final}],
                "rejected": [{"role": "assistant", "content": ini}],
                "p_chosen": p, "score_chosen": p, "score_rejected": 1 - p, "chosen_side": "a",
                "tie": False, "principle_ids": ids[:2], "judgements": judgements,
                "position_consistent": j == 0, "label_mode": "cot", "source": "revisions",
                "provenance": {**base, "stage": "label", "judge": judge},
            })
    labels.append({"id": "tie0", "prompt": [{"role": "user", "content": "tie"}], "p_a": 0.5,
                   "tie": True, "label": "tie", "abstentions": 0, "judgements": []})
    if sft:
        _w(folder / ex.SFT_FILE, revs)
    if prefs:
        _w(folder / ex.PREFS_FILE, pref_rows)
        _w(folder / ex.LABELS_FILE, labels)
        _w(folder / "labels.failures.jsonl", [{"id": "bad", "reason": "all judgements abstained"}])
    if manifest:
        (folder / ex.MANIFEST).write_text(json.dumps({
            "cai_version": "0.1.0", "config": {"backend": "openai", "api_key": "sk-SECRET-KEY"},
            "constitution": const.model_dump(mode="json"), "templates_hash": "t" * 64,
            "models": {"policy": MODEL, "judge": MODEL}, "judge": judge,
            "counts": {"revisions": len(revs), "pairs": len(pref_rows), "ties": 1,
                       "preferences": {"written": len(pref_rows), "judged_by": {"logprobs": 40, "choice": 8}}},
            "calls": {"total": 123},
        }))
    return folder


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    return make_run(tmp_path / "run")


def _pids(ds: datasets.Dataset) -> set[str]:
    return set(ds["prompt_id"])


# --- building the DatasetDict ------------------------------------------------------------------


def test_splits_are_by_prompt_and_keep_trl_columns(run_dir: Path) -> None:
    dd = ex.build(run_dir, test_fraction=0.3).dataset
    assert set(dd) == {"train_sft", "test_sft", "train_prefs", "test_prefs"}
    sft_cols = dd["train_sft"].column_names
    assert sft_cols[0] == "messages" and "prompt" not in sft_cols
    assert dd["train_prefs"].column_names[:5] == ["prompt", "chosen", "rejected", "score_chosen",
                                                  "score_rejected"]
    for kind in ("sft", "prefs"):
        assert not _pids(dd[f"train_{kind}"]) & _pids(dd[f"test_{kind}"])
    # the same prompt is on the same side in both kinds
    assert _pids(dd["test_sft"]) == _pids(dd["test_prefs"])
    assert _pids(dd["train_sft"]) == _pids(dd["train_prefs"])
    assert dd["train_sft"].num_rows + dd["test_sft"].num_rows == 12
    assert dd["train_prefs"].num_rows + dd["test_prefs"].num_rows == 24
    # deterministic, and a seed draws another test set
    again = ex.build(run_dir, test_fraction=0.3).dataset
    assert _pids(again["test_sft"]) == _pids(dd["test_sft"])
    other = [_pids(ex.build(run_dir, test_fraction=0.3, seed=s).dataset["test_sft"])
             for s in (1, 2)]
    assert any(o != _pids(dd["test_sft"]) for o in other)
    row = dd["train_prefs"][0]
    assert row["chosen"][0]["role"] == "assistant" and row["prompt"][0]["role"] == "user"
    assert "judgements" not in dd["train_prefs"].column_names  # trace only with --full


def test_tiny_and_zero_fraction(tmp_path: Path) -> None:
    tiny = make_run(tmp_path / "tiny", prompts=2)
    dd = ex.build(tiny, test_fraction=0.01).dataset
    assert all(dd[s].num_rows for s in ("train_sft", "test_sft", "train_prefs", "test_prefs"))
    dd = ex.build(tiny, test_fraction=0).dataset
    assert set(dd) == {"train_sft", "train_prefs"}
    one = make_run(tmp_path / "one", prompts=1, prefs=False)
    assert set(ex.build(one, test_fraction=0.5).dataset) == {"train_sft"}


def test_full_keeps_trace_as_json(run_dir: Path) -> None:
    dd = ex.build(run_dir, test_fraction=0.2, full=True).dataset
    r = dd["train_sft"][0]
    assert json.loads(r["rounds"])[0]["critique"] == "harmful"
    assert isinstance(json.loads(r["extra"]), dict)
    assert "sk-SECRET" not in "".join(dd["train_sft"]["provenance"])
    assert json.loads(dd["train_prefs"][0]["judgements"])[0]["order"] == "ab"


# --- files and card ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_save_loads_back_by_config(run_dir: Path, tmp_path: Path, fmt: str) -> None:
    export = ex.build(run_dir, test_fraction=0.25)
    out = ex.save(export, tmp_path / "out", fmt, license="mit", repo_id="me/cai-data")
    assert sorted(p.name for p in (out / "data").iterdir()) == sorted(
        f"{s}.{fmt}" for s in ("train_sft", "test_sft", "train_prefs", "test_prefs"))
    for config, splits in (("sft", {"train_sft", "test_sft"}),
                           ("prefs", {"train_prefs", "test_prefs"})):
        got = datasets.load_dataset(str(out), config, cache_dir=str(tmp_path / "cache"))
        assert set(got) == splits
        for s in splits:
            assert got[s].num_rows == export.dataset[s].num_rows
            assert got[s].column_names == export.dataset[s].column_names
    # the default config is found without a name
    default = datasets.load_dataset(str(out), cache_dir=str(tmp_path / "c2"))
    assert set(default) == {"train_sft", "test_sft"}


def test_card_has_constitution_judge_models_counts_diagnostics(run_dir: Path, tmp_path: Path):
    export = ex.build(run_dir, test_fraction=0.25)
    out = ex.save(export, tmp_path / "out", license="mit")
    text = (out / "README.md").read_text()
    front = yaml.safe_load(text.split("---")[1])
    assert front["license"] == "mit" and "text-generation" in front["task_categories"]
    assert {c["config_name"] for c in front["configs"]} == {"sft", "prefs"}
    assert "rlaif" in front["tags"]
    const = load_constitution()
    # the constitution in full: the YAML block in the card is the constitution itself
    block = text.split("```yaml\n")[1].split("```")[0]
    assert yaml.safe_load(block) == const.model_dump(mode="json")
    for p in const.principles:
        assert p.id in text
    assert MODEL in text
    for needle in ("| both orders | True |", "| principles per pair | 2 |", "| CoT clamp | `[0.4, 0.6]` |",
                   "| label mode | cot |", "| tie threshold | 0.05 |",
                   "position consistent", "12/24 (50.0%)", "ties (held out",
                   "abstained judgements", "12/48", "mean chars, chosen", "chosen longer",
                   "agreement with human labels", "labels.failures.jsonl", "mean revision rounds",
                   "## Figures (`cai report`)", "## Source data", "- Prompts: `prompts.jsonl`."):
        assert needle in text, needle
    for s, ds in export.dataset.items():
        assert f"| {s} | {ds.num_rows} |" in text
    assert "sk-SECRET-KEY" not in text and "<redacted>" in text and "max_tokens 64" in text
    # each setting once: the judge's settings are one table, not repeated in the manifest
    assert text.count("| tie threshold |") == 1 and text.count("| both orders |") == 1 and "tie_threshold" not in text
    assert "Not computed: labels.jsonl:25:" in text and str(tmp_path) not in text  # no machine path


def test_card_without_manifest(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run", manifest=False)
    text = ex.save(ex.build(run), tmp_path / "o1").joinpath("README.md").read_text()
    assert "not in the run folder" in text and MODEL in text and "| both orders | True |" in text
    const = load_constitution().model_dump(mode="json")
    out = ex.save(ex.build(run, constitutions=[const]), tmp_path / "o2")
    text = (out / "README.md").read_text()
    assert "```yaml" in text and "not in the run folder" not in text


def test_save_replaces_an_export_but_not_other_folders(run_dir: Path, tmp_path: Path) -> None:
    export = ex.build(run_dir)
    out = ex.save(export, tmp_path / "out", "jsonl")
    ex.save(export, out, "parquet")
    assert all(p.suffix == ".parquet" for p in (out / "data").iterdir())
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep")
    with pytest.raises(InputError, match="not an earlier cai export"):
        ex.save(export, precious)
    assert (precious / "notes.txt").read_text() == "keep"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left


# --- bad input ---------------------------------------------------------------------------------


@pytest.mark.parametrize("case,match", [
    ("missing", "no such run folder"),
    ("empty_folder", "not a cai run folder"),
    ("empty_files", "hold no rows"),
    ("part", r"unfinished \(preferences.jsonl.part"),
    ("meta", "unfinished"),
    ("between_stages", r"`cai run` has not finished here"),
    ("bad_json", r"revisions.jsonl:2: not valid JSON"),
    ("bad_messages", r"revisions.jsonl:1: `messages` must be"),
    ("no_assistant", r"preferences.jsonl:1: `chosen` must end with an assistant"),
])
def test_bad_run_folders(tmp_path: Path, case: str, match: str) -> None:
    run = tmp_path / "run"
    if case != "missing":
        run.mkdir()
    if case == "empty_files":
        (run / ex.SFT_FILE).write_text("")
        (run / ex.PREFS_FILE).write_text("\n")
    elif case == "part":
        make_run(run)
        shutil.move(run / ex.PREFS_FILE, run / (ex.PREFS_FILE + ".part"))
    elif case == "meta":
        make_run(run)
        (run / (ex.SFT_FILE + ".meta.json")).write_text('{"fingerprint": "x", "complete": false}')
    elif case == "between_stages":
        make_run(run)
        (run / "run.json").write_text('{"cai_version": "0.1.0", "status": "running"}')
    elif case == "bad_json":
        make_run(run)
        lines = (run / ex.SFT_FILE).read_text().splitlines()
        (run / ex.SFT_FILE).write_text(lines[0] + "\n" + lines[1][:40] + "\n")
    elif case in ("bad_messages", "no_assistant"):
        make_run(run)
        bad_msgs = case == "bad_messages"
        name, col = (ex.SFT_FILE, "messages") if bad_msgs else (ex.PREFS_FILE, "chosen")
        rows = [json.loads(x) for x in (run / name).read_text().splitlines()]
        rows[0][col] = "just text" if bad_msgs else [{"role": "user", "content": "x"}]
        _w(run / name, rows)
    with pytest.raises(InputError, match=match) as e:
        ex.build(run)
    assert "\n" not in str(e.value)


class FakeHfApi:
    """Records the calls `push` makes and copies what would be uploaded."""

    calls: list[tuple[str, dict[str, Any]]] = []
    uploaded: dict[str, bytes] = {}
    exists_public = False
    fail: str | None = None

    def __init__(self, token: str | None = None) -> None:
        self.calls.append(("init", {"token": token}))

    def create_repo(self, repo_id: str, **kw: Any) -> str:
        self.calls.append(("create_repo", {"repo_id": repo_id, **kw}))
        return f"https://huggingface.co/datasets/{repo_id}"

    def repo_info(self, repo_id: str, **kw: Any) -> Any:
        self.calls.append(("repo_info", {"repo_id": repo_id, **kw}))
        return type("Info", (), {"private": not self.exists_public})()

    def upload_folder(self, **kw: Any) -> Any:
        if self.fail:
            raise RuntimeError(self.fail)
        self.calls.append(("upload_folder", kw))
        root = Path(kw["folder_path"])
        FakeHfApi.uploaded = {str(p.relative_to(root)): p.read_bytes()
                              for p in root.rglob("*") if p.is_file()}
        return type("Commit", (), {"commit_url": f"https://hf.co/datasets/{kw['repo_id']}/commit/1"})()


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> type[FakeHfApi]:
    monkeypatch.setattr(FakeHfApi, "calls", [])
    monkeypatch.setattr(FakeHfApi, "uploaded", {})
    monkeypatch.setattr("cai.export.hub.HfApi", FakeHfApi)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    return FakeHfApi


def test_cli_push_uploads_the_checked_folder(run_dir: Path, tmp_path: Path, fake_hub, capsys):
    out = tmp_path / "out"
    rc = main(["export", str(run_dir), "-o", str(out), "--push-to-hub", "me/cai-data",
               "--token", TOKEN, "--test-fraction", "0.25"])
    io = capsys.readouterr()
    assert rc == 0, io.err
    names = [c[0] for c in fake_hub.calls]
    assert names == ["init", "create_repo", "repo_info", "upload_folder"]
    create, upload = fake_hub.calls[1][1], fake_hub.calls[3][1]
    assert create["private"] is True and create["repo_type"] == "dataset"
    assert upload["repo_type"] == "dataset" and upload["delete_patterns"] == ["data/*"]
    assert set(fake_hub.uploaded) == {"README.md", *(f"data/{s}.parquet" for s in (
        "train_sft", "test_sft", "train_prefs", "test_prefs"))}
    assert fake_hub.uploaded["README.md"] == (out / "README.md").read_bytes()
    assert 'load_dataset("me/cai-data", "prefs")' in fake_hub.uploaded["README.md"].decode()
    for name, blob in fake_hub.uploaded.items():
        assert TOKEN.encode() not in blob, name
    assert TOKEN not in io.out + io.err and "pushed:" in io.err


def test_push_token_from_env_and_public_flag(run_dir: Path, tmp_path: Path, fake_hub, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["export", str(run_dir), "-o", str(tmp_path / "o"), "--push-to-hub", "me/x",
                 "--public"]) == 0
    assert fake_hub.calls[0] == ("init", {"token": TOKEN})
    assert fake_hub.calls[1][1]["private"] is False


def test_push_refusals_push_nothing(run_dir: Path, fake_hub, monkeypatch, capsys):
    monkeypatch.setattr("huggingface_hub.get_token", lambda: None)
    assert main(["export", str(run_dir), "--push-to-hub", "me/x"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and not fake_hub.calls
    # half-finished folder: clear error, nothing written, nothing pushed
    (run_dir / "revisions.jsonl.part").write_text("")
    assert main(["export", str(run_dir), "--push-to-hub", "me/x", "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "unfinished" in err and len(err.strip().splitlines()) == 1
    assert not fake_hub.calls and not (run_dir / "export").exists()
    (run_dir / "revisions.jsonl.part").unlink()
    # an existing public repo with --private: refused before any upload
    monkeypatch.setattr(FakeHfApi, "exists_public", True)
    assert main(["export", str(run_dir), "--push-to-hub", "me/x", "--token", TOKEN]) == 2
    assert "exists and is public" in capsys.readouterr().err
    assert "upload_folder" not in [c[0] for c in fake_hub.calls]


def test_push_failure_never_shows_the_token(run_dir: Path, tmp_path: Path, fake_hub, monkeypatch,
                                            capsys) -> None:
    monkeypatch.setattr(FakeHfApi, "fail", f"401 Unauthorized for token {TOKEN}\nheaders...")
    assert main(["export", str(run_dir), "--push-to-hub", "me/x", "--token", TOKEN]) == 2
    err = capsys.readouterr().err
    assert "push to me/x failed: 401" in err and TOKEN not in err and "run the command again" in err


def test_token_in_rows_is_refused(run_dir: Path, fake_hub) -> None:
    rows = (run_dir / ex.SFT_FILE).read_text().replace("talk to them", f"use {TOKEN}", 1)
    (run_dir / ex.SFT_FILE).write_text(rows)
    with pytest.raises(InputError, match="holds your Hugging Face token"):
        ex.build(run_dir, secrets=[TOKEN])
    assert main(["export", str(run_dir), "--push-to-hub", "me/x", "--token", TOKEN]) == 2
    assert not fake_hub.calls


def test_push_refuses_an_incomplete_folder(tmp_path: Path) -> None:
    with pytest.raises(CaiError, match="not a complete cai export"):
        ex.push(tmp_path, "me/x", token=TOKEN, api=FakeHfApi())


def test_cli_constitution_must_match(tmp_path: Path, capsys) -> None:
    run = make_run(tmp_path / "run", manifest=False)
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"name": "other", "principles": [
        {"id": "a", "critique": "c", "revision": "r", "comparison": "q"}]}))
    assert main(["export", str(run), "-c", str(other)]) == 2
    assert "is not the constitution this run used" in capsys.readouterr().err


def test_help_explains_every_option() -> None:
    cmd = typer.main.get_command(app).commands["export"]  # type: ignore[attr-defined]
    assert cmd.help and "train_prefs" in cmd.help
    for p in cmd.params:
        assert getattr(p, "help", None), f"{p.name} has no help"


@pytest.mark.hub
@pytest.mark.skipif(not os.environ.get("HF_TOKEN"), reason="needs HF_TOKEN (and -m hub)")
def test_real_push(tmp_path: Path) -> None:
    from huggingface_hub import HfApi

    api = HfApi()
    repo = f"{api.whoami()['name']}/cai-export-test-{uuid.uuid4().hex[:8]}"
    run = make_run(tmp_path / "run", prompts=6)
    try:
        assert main(["export", str(run), "-o", str(tmp_path / "out"), "--push-to-hub", repo]) == 0
        prefs = datasets.load_dataset(repo, "prefs", cache_dir=str(tmp_path / "cache"))
        assert set(prefs) == {"train_prefs", "test_prefs"}
        card = api.hf_hub_download(repo, "README.md", repo_type="dataset")
        assert os.environ["HF_TOKEN"] not in Path(card).read_text()
    finally:
        api.delete_repo(repo, repo_type="dataset", missing_ok=True)


def test_exports_a_real_cai_run(tmp_path: Path, hh_dev: Path, capsys) -> None:
    """A folder written by `cai run` (fake backend) exports, and its card shows the judge."""
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(hh_dev.read_text().splitlines(keepends=True)[:16]))
    out = tmp_path / "run"
    assert main(["run", "--input", str(prompts), "-o", str(out), "--backend", "fake",
                 "--revise-rounds", "1", "--cache", "off"]) == 0
    assert main(["export", str(out), "--test-fraction", "0.25"]) == 0
    assert "export: train_sft" in capsys.readouterr().err
    text = (out / "export" / "README.md").read_text()
    for needle in ("| both orders | True |", "| principles per pair | 4 |", "| runs of `cai run` | 1 |",
                   "```yaml", "- Prompts: `in.jsonl`"):
        assert needle in text, needle
    assert str(tmp_path) not in text  # no path of the machine that made it
    sft = datasets.load_dataset(str(out / "export"), "sft", cache_dir=str(tmp_path / "c"))
    prefs = datasets.load_dataset(str(out / "export"), "prefs", cache_dir=str(tmp_path / "c"))
    rejected = {json.loads(x)["id"] for x in (out / "rejects.jsonl").read_text().splitlines()}
    assert sft["train_sft"].num_rows + sft["test_sft"].num_rows == 16 - len(rejected)  # gates keep them out
    assert "quality gates (rejects.jsonl)" in text
    train = _pids(sft["train_sft"]) | _pids(prefs["train_prefs"])
    assert not train & (_pids(sft["test_sft"]) | _pids(prefs.get("test_prefs", sft["test_sft"])))


def test_card_embeds_the_report_headline(tmp_path: Path) -> None:
    """A real (fake-backend) run: the card quotes `cai report`'s headline figures."""
    from cai.backends.fake import FakeBackend
    from cai.config import RunConfig
    from cai.pipeline import run_pipeline

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question {i}?"}) + "\n" for i in range(8)))
    cfg = RunConfig.model_validate({"input": str(prompts), "output": str(tmp_path / "run"), "backend": "fake",
                                    "progress": False, "revise": {"rounds": 1}})
    run_pipeline(cfg, backend=FakeBackend())
    text = (ex.save(ex.build(tmp_path / "run"), tmp_path / "out") / "README.md").read_text()
    assert "## Figures (`cai report`)" in text
    for name in ("revision preferred", "position consistency", "longer answer chosen"):
        assert f"| {name} | " in text, name


def test_length_debiased_scores_are_opt_in(tmp_path: Path) -> None:
    """label.debias_length writes the debiased label beside the raw one; export can use it."""
    from cai.backends.base import Completion, Request
    from cai.backends.fake import FakeBackend, default_respond
    from cai.config import RunConfig
    from cai.pipeline import run_pipeline

    def longer_wins(req: Request) -> Completion | str:
        last = req.messages[-1]["content"]
        if req.sampling.logprobs:
            return default_respond(req)
        n = int(last.split("#")[-1].split()[0]) if "#" in last else 3
        return "word " * (5 + 7 * (n % 5)) if "Revision" in last else f"short answer #{n}"

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"question #{i} please"}) + "\n" for i in range(12)))
    base = {"input": str(prompts), "backend": "fake", "progress": False, "revise": {"rounds": 1},
            "gates": {"keep": "all", "text": False}}
    cfg = RunConfig.model_validate({**base, "output": str(tmp_path / "run"), "label": {"debias_length": True}})
    run_pipeline(cfg, backend=FakeBackend(longer_wins))
    prefs = [json.loads(x) for x in (tmp_path / "run" / "preferences.jsonl").read_text().splitlines()]
    assert prefs and all(0 < p["p_chosen_length_debiased"] < 1 for p in prefs)
    assert any(abs(p["p_chosen_length_debiased"] - p["p_chosen"]) > 1e-6 for p in prefs)
    dd = ex.build(tmp_path / "run", test_fraction=0, score="length-debiased").dataset["train_prefs"]
    by_id = {p["id"]: p["p_chosen_length_debiased"] for p in prefs}
    assert all(r["score_chosen"] == pytest.approx(by_id[r["id"]]) for r in dd)
    raw = RunConfig.model_validate({**base, "output": str(tmp_path / "raw")})
    run_pipeline(raw, backend=FakeBackend(longer_wins))
    with pytest.raises(InputError, match="debias_length"):
        ex.build(tmp_path / "raw", score="length-debiased")
