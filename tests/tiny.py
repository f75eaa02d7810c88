"""Tiny configurations for tests: distinct, non-power-of-two sizes so swapped dimensions fail."""

from sce_hf import SCEConfig


TINY_HEADS = dict(
    projector_hidden_size=24,
    projector_output_size=10,
    projector_num_layers=3,
    predictor_hidden_size=28,
    predictor_num_layers=2,
    queue_size=36,
)

TINY_BACKBONES = {
    "resnet": dict(model_type="resnet", layer_type="basic", depths=[1, 1], hidden_sizes=[12, 20], embedding_size=8),
    "convnext": dict(model_type="convnext", depths=[1, 1], hidden_sizes=[12, 20], patch_size=2, num_stages=2),
    "vit": dict(
        model_type="vit", hidden_size=20, num_hidden_layers=1, num_attention_heads=2, intermediate_size=28,
        image_size=16, patch_size=4,
    ),
}


def tiny_config(backbone: str = "resnet", **overrides) -> SCEConfig:
    """An SCE config whose trunk has a few thousand parameters and takes 16 px images."""
    values = dict(TINY_HEADS, backbone_config=dict(TINY_BACKBONES[backbone]))
    if backbone == "resnet":
        values["small_input_stem"] = True
    values.update(overrides)
    return SCEConfig(**values)


def load_script(relative_path: str):
    """Import a script of the repository (training/..., benchmarks/...) as a module, once per test session."""
    import importlib.util
    import os
    import sys

    name = "script_" + relative_path.replace("/", "_").removesuffix(".py")
    if name not in sys.modules:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        spec = importlib.util.spec_from_file_location(name, os.path.join(root, relative_path))
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


_WITHOUT_SCE_HF = """import sys
sys.modules["sce_hf"] = None  # this process cannot import the package: the folder's remote code must do the work
try:
    import sce_hf  # noqa: F401
    raise SystemExit("sce_hf should not be importable here")
except ImportError:
    pass
"""


def run_without_sce_hf(body: str, *args, cwd, env: dict | None = None, timeout: int = 300) -> None:
    """Run the Python source `body` (its `sys.argv[1:]` are `args`) in a fresh interpreter that cannot import
    sce_hf, from `cwd`, with an empty `PYTHONPATH` and `HF_HOME` under `cwd` unless `env` overrides them; fails the
    test with the child's stderr."""
    import os
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    script = Path(cwd) / "without_sce_hf.py"
    script.write_text(_WITHOUT_SCE_HF + textwrap.dedent(body))
    child_env = {**os.environ, "HF_HOME": str(Path(cwd) / "hf_home"), "PYTHONPATH": "", **(env or {})}
    result = subprocess.run([sys.executable, str(script), *map(str, args)], cwd=cwd, env=child_env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stderr[-4000:]
