"""Checks an installed hyperforget wheel: `check_wheel.py WHEEL README.md`, run outside the repository.

1. The wheel's only top-level package is `hyperforget` (it never shadows `zoo`, `hyper`, ...).
2. `import hyperforget` comes from the installed wheel and its facade resolves every export.
3. The README's shell and Python loader example run as written, in this directory.
"""

import os
import re
import subprocess
import sys
import zipfile

wheel, readme = sys.argv[1], sys.argv[2]
tops = {n.split("/")[0] for n in zipfile.ZipFile(wheel).namelist()}
tops = {t for t in tops if not t.endswith((".dist-info", ".data"))}
assert tops == {"hyperforget"}, f"the wheel installs top-level {sorted(tops)}, not only hyperforget"

import hyperforget  # noqa: E402

assert "site-packages" in hyperforget.__file__, hyperforget.__file__
for name in hyperforget.__all__:
    getattr(hyperforget, name)
for other in ("zoo", "hyper", "queries", "pipelines"):
    try:
        __import__(other)
    except ImportError:
        continue
    raise AssertionError(f"`import {other}` works: the wheel must not install it at top level")

text = open(readme, encoding="utf-8").read()
section = text[text.index("Another project streams"):]
shell = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
python = re.search(r"```python\n(.*?)```", section, re.S).group(1)
bindir = os.path.dirname(sys.executable)
env = {**os.environ, "PATH": bindir + os.pathsep + os.environ["PATH"]}
subprocess.run(["bash", "-euo", "pipefail", "-c", shell], check=True, env=env)
exec(compile(python, "README.md", "exec"), {})
print(f"wheel ok: top-level {sorted(tops)}, facade {len(hyperforget.__all__)} names, README loader example ran")
