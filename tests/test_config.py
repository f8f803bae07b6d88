from pathlib import Path

import pytest

from grasp_cli.config import describe, load_config, sections_hash, to_toml
from grasp_cli.errors import ConfigError

CONFIGS = Path(__file__).resolve().parents[1] / "configs"

REPO = Path(__file__).resolve().parents[1]


def test_defaults_and_every_shipped_config_load():
    assert load_config(None).sketch.k == 256
    for path in sorted((REPO / "configs").glob("*.toml")):
        load_config(path)


def test_file_then_overrides_win(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("[sketch]\nk = 64\nprojection = 'sjlt'\n[surrogate]\nk_grid = [16, 32]\n")
    config = load_config(
        path, ["sketch.k=128", "surrogate.ridge_grid=[1.0, inf]", "run.device=auto"]
    )
    assert config.sketch.k == 128
    assert config.sketch.projection == "sjlt"
    assert config.surrogate.ridge_grid == [1.0, float("inf")]
    assert config.run.device == "auto"


def test_unknown_key_names_key_and_file(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[sketch]\nkk = 3\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*sketch\.kk"):
        load_config(path)


def test_unknown_section_and_wrong_type(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text("[nope]\nx = 1\n")
    with pytest.raises(ConfigError, match=r"unknown section \[nope\]"):
        load_config(path)
    path.write_text("[sketch]\nk = 'big'\n")
    with pytest.raises(ConfigError, match=r"bad\.toml: sketch\.k: expected an integer"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"--set: retrain\.steps: expected an integer"):
        load_config(None, ["retrain.steps=1.5"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["steps=3"])


def test_choice_validation():
    with pytest.raises(ConfigError, match="sketch.projection"):
        load_config(None, ["sketch.projection='fft'"])
    with pytest.raises(ConfigError, match="k_grid"):
        load_config(None, ["sketch.k=16", "surrogate.k_grid=[32]"])


def test_hash_ignores_speed_knobs_but_not_semantics():
    base = load_config(None)
    faster = load_config(None, ["sketch.batch_size=7", "run.threads=1"])
    other = load_config(None, ["sketch.k=128", "surrogate.k_grid=[32]"])
    assert sections_hash(base, ["sketch", "run"]) == sections_hash(faster, ["sketch", "run"])
    assert sections_hash(base, ["sketch"]) != sections_hash(other, ["sketch"])


def test_describe_lists_every_section():
    text = describe(load_config(None))
    for section in ("[run]", "[prepare]", "[sketch]", "[retrain]", "[surrogate]", "[select]"):
        assert section in text


# ---------------------------------------------------------------- shipped recipes


@pytest.mark.parametrize("name", sorted(p.name for p in CONFIGS.glob("*.toml")))
def test_every_shipped_recipe_loads_and_validates(name):
    config = load_config(CONFIGS / name)
    assert to_toml(config)  # and writes back as TOML


def test_small_recipe_runs_on_user_documents_with_given_tasks(text_corpus, tmp_path):
    """configs/small.toml names no demo domain: it prepares a user's own files with --task."""
    from tests.conftest import grasp_ok

    task = tmp_path / "qa.jsonl"
    task.write_text('{"text": "What is the capital of France? Paris is."}\n' * 3)
    run = tmp_path / "run"
    out = grasp_ok(
        "prepare", text_corpus, "--task", f"qa={task}", "--run", run, "-c", CONFIGS / "small.toml"
    )
    assert "qa" in out and (run / "tasks" / "qa.parquet").is_file()
    dry_run = grasp_ok("sketch", "--run", run, "-c", CONFIGS / "small.toml", "--dry-run")
    assert 'projection = "gaussian"' in dry_run
