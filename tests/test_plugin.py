"""The README's plug-in example runs as printed: a third-party method registered, trained with LowRankTrainer,
saved and reloaded factorized."""

import re
import subprocess
import sys
from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_plugin_example_trains_saves_and_reloads(tmp_path):
    block = re.search(r"<!-- plugin-example:start -->\n```python\n(.*?)```\n<!-- plugin-example:end -->",
                      README.read_text(), re.S)
    assert block, "the README lost its plug-in example"
    code = block.group(1)
    assert len([line for line in code.splitlines() if line.strip()]) < 40
    (tmp_path / "example.py").write_text(code)
    result = subprocess.run([sys.executable, "example.py"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={"HF_HUB_OFFLINE": "1", "PATH": "", "OMP_NUM_THREADS": "1",
                                              "HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr[-3000:]
    # every layer started at 8 of 32 and was halved once: the reloaded model holds rank 4 everywhere
    table = [line for line in result.stdout.splitlines() if line.startswith("transformer.h.")]
    assert len(table) == 8 and all(" 4/32 " in line for line in table), result.stdout
    assert (tmp_path / "out-halving" / "config.json").is_file()


def test_method_options_are_checked_against_the_options_class():
    import pytest

    import hf_lowrank
    from hf_lowrank.methods import Method

    @hf_lowrank.register_method
    class WithOptions(Method):
        from dataclasses import dataclass as _dc

        @_dc
        class Options:
            at: float = 0.5

        name = "with_options_test"
        options_class = Options

    assert hf_lowrank.LowRankConfig(method="with_options_test", method_options={"at": 0.2}).method_options == {"at": 0.2}
    with pytest.raises(ValueError, match="'nope'.*with_options_test"):
        hf_lowrank.LowRankConfig(method="with_options_test", method_options={"nope": 1})
    with pytest.raises(ValueError, match="takes no method_options"):
        hf_lowrank.LowRankConfig(method="oialr", method_options={"at": 0.2})
