"""Model registry: layout, references, aliases and path safety."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from model import InvalidModelRef, ModelNotFound, ModelRef, Registry
from model.cli import main
from tests.conftest import save_tiny_model


def test_references(tmp_path: Path) -> None:
    save_tiny_model(tmp_path, version="1")
    save_tiny_model(tmp_path, version="2")
    reg = Registry(tmp_path)
    reg.set_alias("tiny", "production", "1")
    reg.set_alias("tiny", "canary", "2")
    assert reg.resolve("tiny").version == "1"  # the production alias wins over the newest version
    assert reg.resolve("tiny:2").version == "2"
    assert reg.resolve("tiny@canary").version == "2"
    assert reg.resolve("tiny@production").path == tmp_path / "tiny" / "1"
    assert reg.next_version("tiny") == "3"
    rows = reg.list()
    assert [(r["name"], r["version"], r["aliases"]) for r in rows] == [
        ("tiny", "1", ["production"]), ("tiny", "2", ["canary"])
    ]


def test_missing_models(tmp_path: Path) -> None:
    save_tiny_model(tmp_path)
    reg = Registry(tmp_path)
    for ref in ("nope", "tiny:9", "tiny@staging"):
        with pytest.raises(ModelNotFound):
            reg.resolve(ref)


@pytest.mark.parametrize("ref", ["../etc", "a/b", "tiny:../../x", "tiny@..", "", "x:y:z", "/abs", "tiny:.hidden"])
def test_refs_that_could_escape_are_rejected(ref: str) -> None:
    with pytest.raises(InvalidModelRef):
        ModelRef.parse(ref)


def test_weights_round_trip_in_half_precision(tmp_path: Path) -> None:
    import torch

    entry = save_tiny_model(tmp_path)
    unet, vq = entry.state_dicts()
    reg = Registry(tmp_path)
    half = reg.save("half", "1", entry.config(), unet, vq, dtype=torch.float16)
    unet16, _ = half.state_dicts()
    assert all(t.dtype == torch.float16 for k, t in unet16.items() if unet[k].is_floating_point())
    assert unet16["input_blocks.1.1.blocks.0.attn.relative_position_index"].dtype == torch.int64
    assert half.config() == entry.config()


def test_registry_copy_command_promotes_in_half_precision(tmp_path: Path) -> None:
    save_tiny_model(tmp_path / "train", name="student")
    Registry(tmp_path / "train").write_metrics(Registry(tmp_path / "train").resolve("student"), {"CSet5": {"psnr_y": 1}})
    assert main(["registry", "copy", "student", "--from", str(tmp_path / "train"), "--registry",
                 str(tmp_path / "serve"), "--alias", "production", "--dtype", "float16", "--tile-sizes", "8,16"]) == 0
    entry = Registry(tmp_path / "serve").resolve("student@production")
    unet, _ = entry.state_dicts()
    assert unet["out.2.weight"].dtype == torch.float16
    assert entry.metrics() == {"CSet5": {"psnr_y": 1}}
    assert entry.config().tile_sizes == (8, 16)

    from model import SRPipeline

    assert SRPipeline.from_registry("student", tmp_path / "serve").tile_sizes == (8, 16)


def test_registry_copy_swaps_in_a_fine_tuned_decoder_only_over_the_same_encoder(tmp_path: Path) -> None:
    """``--autoencoder`` takes the decoder side of a decoder-only fine-tune; a model whose encoder or
    codebook differs is refused, since the UNet's latents would change under it."""
    source, target = tmp_path / "runs", tmp_path / "registry"
    save_tiny_model(source, name="student")
    unet, autoencoder = Registry(source).resolve("student").state_dicts()
    config = Registry(source).resolve("student").config()
    tuned = {k: v + 1 if k.startswith("decoder.") else v for k, v in autoencoder.items()}
    Registry(source).save("decoder", "1", dataclasses.replace(config, kind="autoencoder"), {}, tuned)
    save_tiny_model(source, name="other", seed=1)

    assert main(["registry", "copy", "student", "--from", str(source), "--registry", str(target),
                 "--autoencoder", "decoder"]) == 0
    copied = Registry(target).resolve("student")
    _, swapped = copied.state_dicts()
    assert all(torch.equal(swapped[k], tuned[k]) for k in autoencoder)
    assert copied.config().provenance["decoder"] == "decoder:1"
    assert main(["registry", "copy", "student", "--from", str(source), "--registry", str(target),
                 "--autoencoder", "other"]) == 2
