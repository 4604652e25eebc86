"""Config tree: YAML includes, overrides, errors naming the key, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from medseg.config import (
    Config,
    ConfigError,
    apply_override,
    flatten,
    from_dict,
    load_config,
    save_config,
    to_dict,
)

ROOT = Path(__file__).resolve().parents[2]


def write(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data))
    return path


def test_defaults_and_name_from_file(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "exp1.yaml", {}))
    assert isinstance(cfg, Config)
    assert cfg.name == "exp1"
    assert cfg.train.epochs == Config().train.epochs


def test_include_merge_order_and_own_keys_win(tmp_path: Path) -> None:
    (tmp_path / "frag").mkdir()
    write(tmp_path / "frag" / "a.yaml", {"train": {"epochs": 3, "lr": 0.5}, "data": {"root": "A"}})
    write(tmp_path / "frag" / "b.yaml", {"train": {"epochs": 4}})
    main = write(tmp_path / "p.yaml", {"include": ["frag/a.yaml", "frag/b.yaml"], "data": {"root": "C"}})
    cfg = load_config(main)
    assert cfg.train.epochs == 4  # b after a
    assert cfg.train.lr == 0.5  # kept from a
    assert cfg.data.root == "C"  # the file's own key wins


def test_overrides_typed(tmp_path: Path) -> None:
    p = write(tmp_path / "p.yaml", {})
    cfg = load_config(p, ["train.epochs=2", "data.root=/data/DeepLesion", "data.window_range=[-160, 240]",
                          "train.max_steps=null", "model.params.base_channels=8", "train.lr=1e-4"])
    assert cfg.train.epochs == 2
    assert cfg.data.root == "/data/DeepLesion"
    assert cfg.data.window_range == [-160.0, 240.0]
    assert cfg.train.max_steps is None
    assert cfg.model.params == {"base_channels": 8}
    assert cfg.train.lr == pytest.approx(1e-4)


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.epoch=2", "train.epoch"),
        ("trian.epochs=2", "trian"),
        ("train.epochs=two", "train.epochs"),
        ("train.epochs=2.5", "train.epochs"),
        ("data.include_noisy=3", "data.include_noisy"),
        ("transforms.elastic.sigma=abc", "transforms.elastic.sigma"),
        ("transforms.elastic.sgima=3", "transforms.elastic.sgima"),
        ("data.window_range=[a, 1]", "data.window_range[0]"),
    ],
)
def test_errors_name_the_key(tmp_path: Path, override: str, key: str) -> None:
    p = write(tmp_path / "p.yaml", {})
    with pytest.raises(ConfigError) as e:
        load_config(p, [override])
    assert key in str(e.value)


def test_unknown_key_in_file(tmp_path: Path) -> None:
    p = write(tmp_path / "p.yaml", {"train": {"epochs": 1, "learning_rate": 0.1}})
    with pytest.raises(ConfigError, match=r"train\.learning_rate"):
        load_config(p)


def test_bad_override_syntax_and_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_override({}, "train.epochs")
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_include_cycle(tmp_path: Path) -> None:
    write(tmp_path / "a.yaml", {"include": ["b.yaml"]})
    write(tmp_path / "b.yaml", {"include": ["a.yaml"]})
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")


def test_round_trip_and_flatten(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path / "p.yaml", {}), ["train.epochs=7"])
    save_config(cfg, tmp_path / "resolved.yaml")
    again = from_dict(yaml.safe_load((tmp_path / "resolved.yaml").read_text()))
    assert again == cfg
    flat = flatten(to_dict(cfg))
    assert flat["train.epochs"] == 7
    assert flat["transforms.elastic.sigma"] == 10.0


@pytest.mark.parametrize("pipeline", sorted((ROOT / "pipelines").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_pipeline_loads(pipeline: Path) -> None:
    cfg = load_config(pipeline)
    assert cfg.model.name
    assert cfg.name == pipeline.stem


def test_docs_configuration_documents_every_config_key() -> None:
    reference = (ROOT / "docs" / "configuration.md").read_text()
    missing = []
    for key in flatten(to_dict(Config())):
        if key.startswith("inference.crf."):
            key = "inference.crf.*"
        last = key.rsplit(".", 1)[-1]
        if f"`{key}`" not in reference and f".{last}`" not in reference and f"`{key}," not in reference:
            missing.append(key)
    assert not missing, f"docs/configuration.md (the config reference) lacks: {missing}"


@pytest.mark.parametrize("override", ["inference.mode=tiles", "train.schedule=step", "data.window=lung",
                                      "metrics.connectivity=3", "train.monitor_mode=lowest"])
def test_choice_keys_list_valid_values(tmp_path: Path, override: str) -> None:
    key = override.split("=")[0]
    with pytest.raises(ConfigError, match=rf"{key}.*is not one of"):
        load_config(write(tmp_path / "p.yaml", {}), [override])


def test_bare_on_off_reads_as_choice(tmp_path: Path) -> None:
    p = write(tmp_path / "p.yaml", {})
    assert load_config(p, ["train.amp=on"]).train.amp == "on"
    assert load_config(p, ["train.amp=off"]).train.amp == "off"
