"""The command line, as scripts call it."""

from __future__ import annotations

import json

import pytest

from ablation_core.cli import main

TINY = ["--steps", "4", "--batch-size", "2", "--anchor-images", "4", "--sampler-steps", "2", "--lr", "1e-3",
        "--latent-size", "8"]


@pytest.fixture(scope="module")
def cli_patch(checkpoint_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "grumpy.safetensors"
    assert main(["ablate", "--model", str(checkpoint_files["sd1"]), "--target", "Grumpy Cat", "--anchor", "cat",
                 "--out", str(out), "--device", "cpu", "--seed", "3", "--rank", "2", *TINY]) == 0
    return out


def test_ablate_writes_a_patch_and_says_where(cli_patch, capsys):
    assert cli_patch.exists()
    assert main(["inspect", str(cli_patch), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["storage"] == "lora" and info["max_rank"] == 2 and info["layers"] == 12
    assert info["metadata"]["ablation.group"] == "kv" and info["metadata"]["ablation.seed"] == "3"


def test_inspect_prints_metadata(cli_patch, capsys):
    assert main(["inspect", str(cli_patch), "--keys"]) == 0
    out = capsys.readouterr().out
    assert "ablation.targets" in out and "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k" in out


def test_apply_renders_before_and_after(cli_patch, checkpoint_files, tmp_path):
    image = tmp_path / "compare.png"
    assert main(["apply", "--model", str(checkpoint_files["sd1"]), "--patch", str(cli_patch), "--prompt",
                 "a photo of Grumpy Cat", "--out", str(image), "--images", "2", "--sampler-steps", "2",
                 "--latent-size", "8"]) == 0
    from PIL import Image

    assert Image.open(image).size[0] > 2 * 128


def test_merge_writes_one_patch(cli_patch, tmp_path, capsys):
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(cli_patch), str(cli_patch), "--weights", "0.5", "0.5", "--out", str(out),
                 "--full-rank"]) == 0
    assert out.exists() and "merged 2 patches" in capsys.readouterr().out


def test_errors_are_one_clear_line(tmp_path, capsys):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"nope")
    code = main(["ablate", "--model", str(bad), "--target", "a", "--anchor", "b", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "Traceback" not in err


def test_interrupted_ablation_writes_nothing(checkpoint_files, tmp_path, monkeypatch, capsys):
    import ablation_core.methods.ablation.loop as ablate_module

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ablate_module, "sample_latents", interrupted)
    out = tmp_path / "never.safetensors"
    code = main(["ablate", "--model", str(checkpoint_files["sd1"]), "--target", "Grumpy Cat", "--anchor", "cat",
                 "--out", str(out), *TINY])
    assert code == 130 and not out.exists() and list(tmp_path.iterdir()) == []
    assert "nothing was written" in capsys.readouterr().err


def test_the_closed_form_can_leave_out_the_builtin_bank(checkpoint_files, tmp_path):
    from safetensors import safe_open

    preserved = {}
    for flags in ([], ["--no-builtin-bank"]):
        out = tmp_path / f"vangogh{len(flags)}.safetensors"
        assert main(["ablate", "--model", str(checkpoint_files["sd1"]), "--method", "closed-form", "--target",
                     "Van Gogh", "--anchor", "painting", "--kind", "style", "--preserve", "Monet", "--out", str(out),
                     "--device", "cpu", *flags]) == 0
        with safe_open(str(out), "pt") as f:
            preserved[bool(flags)] = int(f.metadata()["ablation.preserved_prompts"])
    # the bank's 50 words x 4 templates, less "painting" (the anchor is kept either way)
    assert preserved == {False: 4 * 51, True: 4 * 2}
