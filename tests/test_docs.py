"""The docs' commands stay true, without running them: every ```bash block of README.md,
docs/**/*.md and the benchmarks/, launch/ and data_pipelines/ READMEs names only entrypoints,
sub-commands (usage lines of the CLI's docstring), flags (absl's own included), config presets,
config keys and repository paths that exist. `--config.a.b=...` must be a key of the command's
`--config configs/X.py:PRESET`. A repository script's flags (`python [-m] benchmarks/...`,
`launch/x.sh`, `sbatch launch/x.sbatch`) must be in its source; the launchers pass the others to
brainlm-pretrain (config keys of their PRESET argument). Paths under configs/, docs/, ... must
exist, ../shared/data/... too where that folder is; runs/, gs://, /data and placeholders (DIR,
BUCKET) are not checked. Tolerated: `...` (arguments elided), `[--opt V]`, `--target A | B` and
`a|b` (alternatives), comments, heredoc bodies, `VAR=x cmd`, `for ...; do ...; done`.
"""

import configparser
import functools
import glob
import importlib
import json
import re
import shlex
import subprocess
import sys

import pytest

from tests.conftest import REPO, SHARED_DATA
from tests.test_tutorial import bash_blocks


DOCS = sorted({REPO / "README.md", *REPO.glob("docs/**/*.md"), *REPO.glob("benchmarks/README.md"),
               *REPO.glob("launch/README.md"), *REPO.glob("data_pipelines/README.md")})
REPO_DIRS = ("configs/", "docs/", "benchmarks/", "launch/", "data_pipelines/", "brainlm_jax/",
             "tests/", ".ci/")
SHARED = "../shared/data/"
_ALTERNATIVE = re.compile(r"(?<=\w)\|(?=[\w-])|\s\|\s*(?=[A-Z][A-Z0-9_]*(?:\s|$))")
_PLACEHOLDER = re.compile(r"^[A-Z][A-Z_]*$")  # DIR, BIDS_DIR (not A424)
_PRESET = re.compile(r"configs/[\w/]+\.py(?::[\w.-]+)?")  # without a preset: get_config()
_KEYWORDS = {"do", "then", "else", "time", "exec", "!", "{", "}"}
_SCRIPT = re.compile(r"^(launch|benchmarks|docs|data_pipelines|\.ci)/[\w/.-]+\.(py|sh|sbatch)$")

# One process for all entrypoints: each CLI module is imported and its new flags are read, then
# removed (the CLIs share flag names: --config, --out, ... would be defined twice).
_FLAGS = r"""
import importlib, json, re, sys
from absl import app, flags
from brainlm_jax.cli import common
app.define_help_flags()
F = flags.FLAGS
base, out = set(F) | {"flagfile", "undefok"}, {}
for name, target in json.loads(sys.argv[1]).items():
  before, owners = set(F), set(F.flags_by_module_dict())
  module = importlib.import_module(target.split(":")[0])
  mine = set(F) - before
  names = base | mine
  usage = re.findall(rf"^\s*{name} ([a-z][\w-]*)\b", module.__doc__ or "", re.M)  # sub-commands
  out[name] = {"flags": sorted(names), "bools": sorted(f for f in names if f in F and F[f].boolean),
               "subcommands": list(dict.fromkeys(usage))}
  for f in mine:
    delattr(F, f)
  for m in set(F.flags_by_module_dict()) - owners - {module.__name__}:
    sys.modules.pop(m, None)  # a shared dependency that defined flags: defines them again
print(json.dumps(out))
"""


def entrypoints() -> dict[str, str]:
  """console script name -> "module:function", from setup.cfg."""
  cfg = configparser.ConfigParser(interpolation=None)
  cfg.read(REPO / "setup.cfg")
  lines = cfg.get("options.entry_points", "console_scripts", fallback="").splitlines()
  return dict(map(str.strip, line.split("=", 1)) for line in lines if "=" in line)


@pytest.fixture(scope="module")
def cli():
  proc = subprocess.run([sys.executable, "-c", _FLAGS, json.dumps(entrypoints())], cwd=REPO,
                        capture_output=True, text=True, timeout=120, check=False)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(proc.stdout)


@functools.lru_cache(maxsize=None)
def load_config(spec: str):
  """(config, None), (None, why it does not load) or (None, None): `spec` (configs/X.py:PRESET)
  names a placeholder preset or a missing file (reported as a path)."""
  path, _, preset = spec.partition(":")
  if _PLACEHOLDER.match(preset) or not (REPO / path).is_file():
    return None, None
  try:
    get_config = importlib.import_module(path[:-3].replace("/", ".")).get_config
    return (get_config(preset) if preset else get_config()), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"{type(e).__name__}: {e}"


def has_key(config, dotted: str) -> bool:
  node = config
  for part in dotted.split("."):
    if not hasattr(node, "keys") or part not in node.keys():
      return False
    node = node[part]
  return True


def commands(block: str):
  """(index of the first line, argv) of every simple command of a bash block (argv None: a quote
  is never closed)."""
  lines, i = block.split("\n"), 0
  while i < len(lines):
    start, text = i, lines[i]
    while text.endswith("\\") and i + 1 < len(lines):  # bash drops backslash-newline
      i += 1
      text = text[:-1] + lines[i]
    i += 1
    heredoc = re.search(r"(?<!<)<<-?\s*['\"]?(\w+)", text)
    if heredoc:  # its body is another language's
      while i < len(lines) and lines[i].strip() != heredoc.group(1):
        i += 1
      i, text = i + 1, text[:heredoc.start()]
    while True:
      lex = shlex.shlex(_ALTERNATIVE.sub(" ", text), posix=True, punctuation_chars=True)
      lex.whitespace_split = True
      try:
        tokens = list(lex)
        break
      except ValueError:  # a quotation open across lines, or never closed
        if i == len(lines):
          yield start, None
          return
        text, i = text + "\n" + lines[i], i + 1
    argv, skip = [], False
    for token in [*tokens, ";"]:
      if skip or token == "...":
        skip = False
      elif re.fullmatch(r"[;&|()]+", token):
        if argv:
          yield start, argv
        argv = []
      elif re.fullmatch(r"[<>&]+", token):
        skip = True  # a redirection and its target
      elif argv or not (token in _KEYWORDS or re.match(r"^\w+=", token)):
        token = token[1:] if token.startswith("[") else token  # [--opt V] is optional
        argv.append(token[:-1] if token.endswith("]") and "[" not in token else token)


def check_path(piece: str) -> str | None:
  if any(_PLACEHOLDER.match(p) for p in piece.split("/")) or "$" in piece:
    return None
  local = piece.startswith(REPO_DIRS) or (piece.startswith(SHARED) and SHARED_DATA.is_dir())
  return f"no such path {piece}" if local and not glob.glob(str(REPO / piece)) else None


def check_flags(argv, known, bools, spec, who: str):
  """Problems with the --flags of `argv` for a program with flags `known` and config `spec`."""
  config = load_config(spec)[0] if spec else None
  for token in argv:
    name = token[2:].split("=", 1)[0] if token.startswith("--") else ""
    if not name:
      continue
    if name.startswith("config.") and "config" in known:
      if spec is None:
        yield f"{who}: --{name} without --config configs/X.py:PRESET"
      elif config is not None and not has_key(config, name[7:]):
        yield f"{who}: --{name}: no key {name[7:]!r} in {spec}"
    elif name not in known and not (name.startswith("no") and name[2:] in bools):
      yield f"{who}: no flag --{name}"


def script_flags(path: str) -> set[str]:
  """The flags a repository script defines (argparse, absl or a shell `case`)."""
  source = (REPO / path).read_text(encoding="utf-8")
  return {a or b for a, b in re.findall(
      r"(?:[\"']--|DEFINE_\w+\(\s*[\"'])([\w-]+)[\"'=]|(?<![\w-])--([\w-]+)[)|]", source)}


def check_command(argv, cli):
  """Problems of one command: paths, presets, then the flags of a brainlm-* or script call."""
  specs = [s for t in argv for s in _PRESET.findall(t)]
  for token in argv:
    yield from filter(None, map(check_path, re.split(r"[=,:]", token)))
  for spec in dict.fromkeys(specs):
    if load_config(spec)[1]:
      yield f"{spec} does not load: {load_config(spec)[1]}"
  spec, head, args = (specs or [None])[0], argv[0], argv[1:]
  if head.startswith("brainlm-"):
    info = cli.get(head)
    if info is None:
      yield f"no entrypoint {head}"
    elif args and not args[0].startswith("-") and args[0] not in info["subcommands"]:
      yield f"{head}: no sub-command {args[0]!r} (has: {', '.join(info['subcommands']) or 'none'})"
    if info:
      yield from check_flags(args, set(info["flags"]), set(info["bools"]), spec, head)
    return
  for k, token in enumerate(argv):  # python [-m] SCRIPT, bash SCRIPT, sbatch [opts] SCRIPT, SCRIPT
    module = argv[k + 1] if token == "-m" and k + 1 < len(argv) else ""
    path = module.replace(".", "/") + ".py" if module.split(".")[0] + "/" in REPO_DIRS else token
    if not _SCRIPT.match(path):
      continue
    if not (REPO / path).is_file():
      yield f"no such script {path}" if module else None  # (else reported as a path)
      return
    known, rest = script_flags(path), argv[k + 1:]
    if path.startswith("launch/") and "brainlm-pretrain" in cli:  # the rest: brainlm-pretrain's
      positional = [t for t in rest if not t.startswith("-")]
      presets = [t for t in positional if _PLACEHOLDER.match(t)
                 or load_config(f"configs/pretrain.py:{t}")[0] is not None]
      if not presets:
        yield f"{path}: no configs/pretrain.py preset among its arguments {positional}"
      spec = f"configs/pretrain.py:{(presets or ['PRESET'])[0]}"
      known |= set(cli["brainlm-pretrain"]["flags"])
    yield from check_flags(rest, known, set(), spec, path)
    return


def check_markdown(markdown: str, cli) -> list[str]:
  """Problems of a page's bash blocks, each "LINE (block at LINE): what"."""
  problems, offset = [], 0
  for block in bash_blocks(markdown):
    offset = markdown.index("```bash\n" + block, offset)
    fence = markdown.count("\n", 0, offset) + 1
    for line, argv in commands(block):
      found = check_command(argv, cli) if argv else ["no closing quotation"]
      problems += [f"{fence + 1 + line} (block at {fence}): {p}" for p in found if p]
    offset += len(block)
  return problems


@pytest.mark.parametrize("doc", DOCS, ids=[str(d.relative_to(REPO)) for d in DOCS])
def test_doc_commands(doc, cli):
  problems = check_markdown(doc.read_text(encoding="utf-8"), cli)
  where = doc.relative_to(REPO)
  assert not problems, "\n".join(f"{where}:{p}" for p in problems)


def test_checker_on_a_planted_page(cli):
  md = ("text\n```bash\n# a comment\n"
        "JAX_PLATFORMS=cpu brainlm-pretrain --config configs/pretrain.py:tiny \\\n"
        "  --workdir runs/x [--config.train.num_steps=...] --config.train.bogus=1 --bogus-flag\n"
        "for s in 0 1; do brainlm-finetune --config configs/finetune.py:nosuch --cv site; done\n"
        "brainlm-probe ... --target SEX | AGE_AT_SCAN --cv site|kfold --nofisher-z > log.txt\n"
        "brainlm-prepare parcellate --inputs x [--window 0] && brainlm-prepare nosuch\n"
        "python - <<'EOF'\nprint('--not-a-flag configs/nosuch.py')\nEOF\n"
        "python -m benchmarks.tpu_plan --only 13m --bogus | head -n 3 docs/nosuch.md\n"
        "launch/local.sh tiny runs/t --dry-run --config.model.bogus=2; launch/local.sh PRESET D "
        "--config.x.y=... --workers 2; bash launch/local.sh tyni runs/t\n"
        "brainlm-finetune --config.task.target=x; brainlm-nosuch --x\n"
        "python -c 'import x\nprint(1)' --also docs/nosuch2.md\necho 'unclosed\n```\n")
  assert list(commands("a \\\n  --b c; d\n"))[0] == (0, ["a", "--b", "c"])
  problems = check_markdown(md, cli)
  assert problems.pop(2).startswith(
      "6 (block at 2): configs/finetune.py:nosuch does not load: ValueError: Unknown preset")
  assert problems == [
      "4 (block at 2): brainlm-pretrain: --config.train.bogus: no key 'train.bogus' in "
      "configs/pretrain.py:tiny",
      "4 (block at 2): brainlm-pretrain: no flag --bogus-flag",
      "8 (block at 2): brainlm-prepare: no sub-command 'nosuch' (has: parcellate, build)",
      "12 (block at 2): benchmarks/tpu_plan.py: no flag --bogus",
      "12 (block at 2): no such path docs/nosuch.md",
      "13 (block at 2): launch/local.sh: --config.model.bogus: no key 'model.bogus' in "
      "configs/pretrain.py:tiny",
      "13 (block at 2): launch/local.sh: no flag --workers",
      "13 (block at 2): launch/local.sh: no configs/pretrain.py preset among its arguments "
      "['tyni', 'runs/t']",
      "14 (block at 2): brainlm-finetune: --config.task.target without --config "
      "configs/X.py:PRESET",
      "14 (block at 2): no entrypoint brainlm-nosuch",
      "15 (block at 2): no such path docs/nosuch2.md",  # a quotation across lines
      "17 (block at 2): no closing quotation"]


_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("page", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_links_and_images_exist(page):
  """Every relative link or image of a page points at a file or folder of the repository (an
  image under the git-ignored runs/ never renders)."""
  text = page.read_text(encoding="utf-8")
  bad = []
  for m in _LINK.finditer(text):
    target = m.group(1).split("#")[0]
    if not target or re.match(r"^[a-z]+:", target):
      continue
    path = (page.parent / target).resolve()
    line = text.count("\n", 0, m.start()) + 1
    if not path.exists():
      bad.append(f"{page.relative_to(REPO)}:{line}: {m.group(1)} does not exist")
    elif path.is_relative_to(REPO.resolve()) and path.relative_to(REPO.resolve()).parts[:1] == ("runs",):
      bad.append(f"{page.relative_to(REPO)}:{line}: {m.group(1)} is under the git-ignored runs/")
  assert not bad, "\n".join(bad)
