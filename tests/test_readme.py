"""The README's two set-up commands are exactly what CI runs."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _commands(text):
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(("python3 -m venv", ". .venv/bin/activate"))]


def test_ci_runs_the_readme_commands():
    readme = _commands((ROOT / "README.md").read_text())
    ci = _commands((ROOT / ".ci" / "run").read_text())
    assert len(ci) == 2 and ci == readme, (ci, readme)
    assert "fnbp train" in ci[0] and "pytest" in ci[1]


def test_readme_maps_every_rule_to_a_function():
    import fnbp
    readme = (ROOT / "README.md").read_text()
    for name in ["dense", "identity", "sigmoid", "tanh", "relu", "leaky_relu", "prelu", "step", "sign", "softmax"]:
        assert f"`fnbp.{name}`" in readme, name
        assert callable(getattr(fnbp, name))
    for name in ["half_sse", "sse", "mse", "mae", "cross_entropy", "softmax_cross_entropy", "l2_penalty"]:
        assert f"`fnbp.losses.{name}`" in readme, name
        assert callable(getattr(fnbp.losses, name))


def test_readme_example_runs_and_backprop_equals_grad():
    import re
    import numpy as np
    code = re.search(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    scope = {}
    exec(code, scope)
    for a, b in zip(__import__("jax").tree_util.tree_leaves(scope["grads"]),
                    __import__("jax").tree_util.tree_leaves(scope["grads2"])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
