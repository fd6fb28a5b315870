"""The README and docs/ cannot rot: every command they show is one the script and the run scripts take, or
refuse with the line the page shows; every setting is one the scripts read; every file and link exists."""

import ast
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from cifar10_deepspeed import add_argument, get_ds_config
from cifar10ds.options import check_args, load_ds_config
from conftest import ROOT, launch_env

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_SCRIPTS = sorted(ROOT.glob("run_ds*.sh"))
SHELL = ("bash", "sh", "shell")
# Files the pages name that are not this project's: DeepSpeed's, or what a run writes.
NOT_OURS = {"run.json", "eval.json", "real_accelerator.py", "launch.py", "zero_to_fp32.py", "gpu_check.md"}
OTHER_SETTINGS = {"DS_ACCELERATOR"}  # read by DeepSpeed, not by the run scripts


def page_id(page):
    return str(page.relative_to(ROOT))


def fenced_blocks(text):
    """(language, body) of every fenced block."""
    return re.findall(r"^```(\w*)\n(.*?)^```", text, flags=re.S | re.M)


def shell_commands(text):
    """Every command the page shows: each line of its shell blocks (continuations joined, comments and
    `&&`/`;`/`|` split), and each inline code span that starts like one."""
    commands = []
    for language, body in fenced_blocks(text):
        if language in SHELL:
            for line in body.replace("\\\n", " ").splitlines():
                commands += split_line(line)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for span in re.findall(r"`([^`\n]+)`", prose):
        tokens = split_line(span)
        if tokens and program(tokens[0]) is not None and (len(tokens[0]) > 1 or "run_ds" in tokens[0][0]):
            commands += tokens  # a command, not the name of a program in a sentence
    return [command for command in commands if program(command) is not None]


def split_line(line):
    lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
    lexer.whitespace_split, lexer.commenters = True, "#"
    commands, current = [], []
    for token in lexer:
        if set(token) <= set(";&|"):
            commands.append(current)
            current = []
        else:
            current.append(token)
    return [command for command in commands + [current] if command]


def environment_and_rest(command):
    env = {}
    while command and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", command[0]):
        name, value = command[0].split("=", 1)
        env[name] = value
        command = command[1:]
    return env, command


def program(command):
    """What the command runs, when it is one of the project's: a run script, a launcher or python."""
    _, rest = environment_and_rest(command)
    if not rest:
        return None
    name = Path(rest[0]).name
    if re.fullmatch(r"run_ds\w*\.sh", name) or name in ("deepspeed", "torchrun", "python", "python3"):
        return name
    return None


def read_settings():
    return set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", "".join(script.read_text() for script in RUN_SCRIPTS)))


def script_args_and_world(command, tmp_path):
    """The flags cifar10_deepspeed.py gets and the world size, or the run script's refusal.

    Run scripts run for real, with a stand-in for DeepSpeed's launcher that records its arguments; the
    hostfiles a command names are written first, two nodes each.
    """
    env, rest = environment_and_rest(command)
    name = Path(rest[0]).name
    if name.startswith("run_ds"):
        unread = set(env) - read_settings() - OTHER_SETTINGS
        assert not unread, f"{shlex.join(command)}: the run scripts read no {', '.join(sorted(unread))}"
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir(exist_ok=True)
        fake = bin_dir / "deepspeed"
        fake.write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$ARGV_FILE"\necho "${CUDA_VISIBLE_DEVICES:-}" > "$ARGV_FILE.gpus"\n')
        fake.chmod(0o755)
        if "HOSTFILE" in env:
            (tmp_path / env["HOSTFILE"]).write_text("worker-0 slots=8\nworker-1 slots=8\n")
        clean = {key: value for key, value in os.environ.items() if key not in read_settings()}
        run = subprocess.run([ROOT / name, *rest[1:]], cwd=tmp_path, capture_output=True, text=True,
                             env={**clean, **env, "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                  "ARGV_FILE": str(tmp_path / "argv")})
        if run.returncode:
            return None, None, run.stderr.strip().splitlines()[-1]
        rest = ["deepspeed", *(tmp_path / "argv").read_text().splitlines()]
        gpus = (tmp_path / "argv.gpus").read_text().strip()
        if gpus and "--num_gpus" not in rest:  # the launcher starts a rank on each GPU CUDA_VISIBLE_DEVICES names
            rest.insert(1, f"--num_gpus={len(gpus.split(','))}")
    launcher = rest[0]
    for i, token in enumerate(rest[1:], 1):
        if token.endswith(".py") or token.startswith("-m"):
            break
    else:
        pytest.fail(f"{shlex.join(command)}: no script to run")
    if rest[i] == "-m":
        return None, None, None
    path = Path(rest[i])
    assert (ROOT / path).is_file() or path.is_file(), f"{shlex.join(command)}: no {path}"
    if path.name != "cifar10_deepspeed.py":
        return None, None, None
    options = dict(re.findall(r"--(\w+)[= ](\d+)", " ".join(rest[1:i])))
    if launcher == "torchrun":
        world = int(options.get("nproc_per_node", 1)) * int(options.get("nnodes", 1))
    else:
        world = int(options.get("num_gpus", 1)) * int(options.get("num_nodes", 1))
    return rest[i + 1:], world, None


def refusal(argv, world, tmp_path):
    """The line cifar10_deepspeed.py stops with for these flags on `world` ranks, or None when it runs.

    In a folder that holds the project's config files and, as a user's would, the model file or checkpoint
    an --init-from names."""
    for config in ROOT.glob("*.json"):
        if not (tmp_path / config.name).exists():
            (tmp_path / config.name).symlink_to(config)
    if "--init-from" in argv:
        target = tmp_path / argv[argv.index("--init-from") + 1]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.touch()
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.chdir(tmp_path):
        try:
            args = add_argument(argv)
            config, _ = load_ds_config(args) if args.deepspeed_config else (get_ds_config(args), None)
        except SystemExit:
            return stderr.getvalue().strip()
        reason = check_args(args, config, world)
    return reason and f"cifar10_deepspeed.py: error: {reason}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_command_runs_or_is_refused_as_the_page_shows(page, tmp_path):
    text = page.read_text()
    commands = shell_commands(text)
    assert commands, f"{page_id(page)} shows no command"
    for command in commands:
        argv, world, refused = script_args_and_world(command, tmp_path)
        if argv is not None:
            refused = refusal(argv, world, tmp_path)
        if refused:
            assert refused in text, f"{page_id(page)}: `{shlex.join(command)}` is refused with\n{refused}"


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_page_starts_with_the_command_a_user_runs(page):
    if page.name == "README.md":
        return
    body = page.read_text().split("\n", 1)[1].lstrip("\n")
    language, _ = fenced_blocks(body)[0]
    assert body.startswith("```") and language in SHELL, f"{page_id(page)}: no command under its title"


def slug(heading):
    """GitHub's anchor of a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=page_id)
def test_every_link_and_file_named_exists(page):
    text = page.read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    for target in re.findall(r"\]\(([^)\s]+)\)", prose):
        if re.match(r"\w+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        assert linked.exists(), f"{page_id(page)} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.*)$", linked.read_text(), flags=re.M)
            assert anchor in map(slug, headings), f"{page_id(page)} links to {target}: no such heading"
    for span in re.findall(r"`([^`\n]+)`", prose):
        named = re.fullmatch(r"((?:\.{0,2}/)?(?:[\w.-]+/)*[\w.-]+\.(?:py|sh|json|md|txt|ini))(?:::(\w+))?", span)
        if not named or Path(named.group(1)).name in NOT_OURS or named.group(1).startswith("/"):
            continue
        path = ROOT / named.group(1)
        assert path.is_file(), f"{page_id(page)} names `{span}`: no such file"
        if named.group(2):
            assert f"def {named.group(2)}(" in path.read_text(), f"{page_id(page)} names `{span}`: no such test"


def test_every_setting_in_the_table_is_one_the_scripts_read():
    text = (ROOT / "docs" / "launch.md").read_text()
    table = text.split("| variable |", 1)[1].split("\n\n", 1)[0]
    named = set(re.findall(r"^\| `([A-Z_]+)` \|", table, flags=re.M))
    assert named and named <= read_settings()
    assert read_settings() - named == set(), "a setting the scripts read is missing from docs/launch.md's table"


def test_ci_runs_the_readme_test_commands():
    ci_commands = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-2:]
    readme = (ROOT / "README.md").read_text()
    assert "\n".join(ci_commands) in readme


def test_the_readme_is_at_most_12_kb():
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_the_offload_page_shows_the_config_it_ships():
    """docs/offload.md's JSON block of the tutorial's recipe is ds_config_offload.json's fp16 and ZeRO sections."""
    page = (ROOT / "docs" / "offload.md").read_text()
    block = page.split("```json\n", 1)[1].split("```", 1)[0]
    shipped = json.loads((ROOT / "ds_config_offload.json").read_text())
    assert json.loads("{" + block + "}") == {key: shipped[key] for key in ("fp16", "zero_optimization")}
    reference = json.loads((ROOT / "ds_config.json").read_text())
    assert {key: value for key, value in shipped.items() if key not in ("fp16", "zero_optimization")} == {
        key: value for key, value in reference.items() if key not in ("fp16", "zero_optimization")}


def test_testing_and_benchmarks_stay_short():
    assert (ROOT / "TESTING.md").stat().st_size <= 12 * 1024
    assert (ROOT / "BENCHMARKS.md").stat().st_size <= 8 * 1024


def project_imports():
    """Each of the project's Python files (the script, its tools, the package's modules) and the project's modules
    it imports, as module names."""
    files = [ROOT / name for name in ("cifar10_deepspeed.py", "export_model.py", "predict.py", "plot_metrics.py")]
    files += sorted((ROOT / "cifar10ds").glob("*.py"))
    names = {str(path.relative_to(ROOT).with_suffix("")).replace("/", ".") for path in files}
    imports = {}
    for path in files:
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                found |= {node.module} | {f"{node.module}.{alias.name}" for alias in node.names}
        imports[str(path.relative_to(ROOT).with_suffix("")).replace("/", ".")] = found & names
    return imports


def test_the_lesson_reads_top_to_bottom_and_the_package_never_imports_it():
    """The script is at most 500 lines with deepspeed.initialize in its first half; no module of the package is
    over 400 lines or imports the script; no file imports one that imports it."""
    lesson = (ROOT / "cifar10_deepspeed.py").read_text().splitlines()
    initialize = next(i for i, line in enumerate(lesson, 1) if "deepspeed.initialize(" in line)
    assert len(lesson) <= 500 and initialize <= len(lesson) / 2, (len(lesson), initialize)
    for module in (ROOT / "cifar10ds").glob("*.py"):
        assert len(module.read_text().splitlines()) <= 400, module.name
    imports = project_imports()
    assert all("cifar10_deepspeed" not in found for name, found in imports.items() if name.startswith("cifar10ds."))

    def reachable(name):
        seen, todo = set(), [name]
        while todo:
            for found in imports[todo.pop()] - seen:
                seen.add(found)
                todo.append(found)
        return seen
    for name in imports:
        assert name not in reachable(name), f"{name} imports a file that imports it"


@pytest.mark.slow
def test_the_template_trains_in_a_folder_holding_only_what_the_readme_copies(tmp_path):
    """The README's template command, run as written (its folder made under tmp_path): the copy trains an epoch
    there, alone, with nothing of this checkout on its path."""
    section = (ROOT / "README.md").read_text().split("## Use it as a template", 1)[1]
    command = fenced_blocks(section)[0][1].strip()
    assert "../my_training" in command
    copied = subprocess.run(["bash", "-euo", "pipefail", "-c", command.replace("../my_training", str(tmp_path / "copy"))],
                            cwd=ROOT, capture_output=True, text=True)
    assert copied.returncode == 0, copied.stderr
    assert sorted(os.listdir(tmp_path / "copy")) == ["cifar10_deepspeed.py", "cifar10ds", "requirements.txt"]
    env = {key: value for key, value in launch_env().items() if key != "PYTHONPATH"}
    run = subprocess.run([sys.executable, "cifar10_deepspeed.py", "--deepspeed", "--dataset", "synthetic",
                          "--dtype", "fp32", "-e", "1", "--synthetic-train-size", "800", "--log-interval", "10",
                          "--save-dir", "ckpt"], cwd=tmp_path / "copy", env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    assert "Finished Training" in run.stdout and (tmp_path / "copy" / "ckpt" / "latest").read_text() == "epoch1"
    assert f"{ROOT / 'cifar10'}" not in run.stdout + run.stderr  # no warning or line from this checkout's code
