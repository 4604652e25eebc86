"""Registries: unknown names list the valid ones; params are checked against the factory."""

from __future__ import annotations

import pytest

from medseg.registry import Registry, RegistryError


def make() -> Registry:
    reg = Registry("widget", "widget.name")

    @reg.register("box")
    def box(in_channels: int, size: int = 3, scale: float = 1.0, tags: list[str] | None = None) -> dict:
        return {"in_channels": in_channels, "size": size, "scale": scale, "tags": tags}

    return reg


def test_build_passes_params() -> None:
    assert make().build("box", {"size": 5, "scale": 2}, in_channels=1) == {
        "in_channels": 1, "size": 5, "scale": 2, "tags": None}


def test_unknown_name_lists_valid() -> None:
    with pytest.raises(RegistryError, match=r"unknown widget 'boks'.*valid names: box"):
        make().get("boks")


def test_unknown_param_names_key() -> None:
    with pytest.raises(RegistryError, match=r"widget\.params\.colour.*valid keys: scale, size, tags"):
        make().build("box", {"colour": 1}, in_channels=1)


@pytest.mark.parametrize("params", [{"size": "big"}, {"size": 2.5}, {"scale": True}, {"tags": "a"}])
def test_wrong_type_names_key(params: dict) -> None:
    key = next(iter(params))
    with pytest.raises(RegistryError, match=rf"widget\.params\.{key}"):
        make().build("box", params, in_channels=1)


def test_fixed_key_cannot_be_configured() -> None:
    with pytest.raises(RegistryError, match="set by medseg"):
        make().build("box", {"in_channels": 3}, in_channels=1)


def test_duplicate_and_uppercase_rejected() -> None:
    reg = make()
    with pytest.raises(ValueError):
        reg.register("box")(lambda: None)
    with pytest.raises(ValueError):
        reg.register("Box")
