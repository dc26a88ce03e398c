#!/usr/bin/env python3
"""Static checker for Apptainer definition files, and the extractor of their section bodies.

Apptainer cannot be installed on the CI machines, so this reads a definition file the way
Apptainer's parser does (header `Key: value` lines up to the first line whose first word starts
with `%`; from there on, sections) and reports, with line numbers:

* header keywords Apptainer does not know (it refuses to build), duplicated keywords, missing
  Bootstrap/From, more than one build stage;
* sections Apptainer does not know (it refuses to build), `%app*` sections without an app name,
  sections given twice (Apptainer silently concatenates them);
* this project's rules for a *thin* wrapper: Bootstrap is `docker-daemon` or `docker-archive`, From
  is the image the Dockerfile is built as (`--image`), no `%setup`/`%files`/`%post`/`%pre` (the
  dependencies live only in the Dockerfile), the sections users rely on exist and are not empty,
  `%runscript` passes its arguments on (`"$@"`), `%labels` lines are `KEY VALUE`, and the shell
  sections parse with `sh -n`.

    python scripts/check_apptainer_def.py apptainer.def --image zoobot-hpc:latest
    python scripts/check_apptainer_def.py apptainer.def --section test     # print %test's body

Exit status: 0 when the file passes, 1 when it does not (one line per problem), 2 on bad usage.
"""

from __future__ import annotations

import argparse
import difflib
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

# Apptainer's definition-file reference (and its parser): every header keyword of every bootstrap agent.
HEADER_KEYWORDS = {
    "bootstrap": "Bootstrap",
    "from": "From",
    "stage": "Stage",
    "includecmd": "IncludeCmd",
    "registry": "Registry",
    "namespace": "Namespace",
    "library": "Library",
    "fingerprints": "Fingerprints",
    "mirrorurl": "MirrorURL",
    "updateurl": "UpdateURL",
    "osversion": "OSVersion",
    "include": "Include",
    "setopt": "SetOpt",
    "confurl": "ConfURL",
    "product": "Product",
    "user": "User",
    "regcode": "Regcode",
    "productpgp": "ProductPGP",
    "registerurl": "RegisterURL",
    "modules": "Modules",
    "otherurl": "OtherURL<N>",  # numbered: OtherURL0, OtherURL1, ...
}
SECTIONS = (
    "setup",
    "files",
    "environment",
    "post",
    "runscript",
    "startscript",
    "test",
    "labels",
    "help",
    "arguments",
    "pre",  # deprecated, still accepted by Apptainer
)
APP_SECTIONS = ("appinstall", "appfiles", "appenv", "apprun", "appstart", "apptest", "applabels", "apphelp")
SHELL_SECTIONS = ("setup", "environment", "post", "runscript", "startscript", "test", "pre")
SHELL_APP_SECTIONS = ("appinstall", "appenv", "apprun", "appstart", "apptest")

# This project's policy for its thin wrapper around the Docker image.
THIN_BOOTSTRAPS = ("docker-daemon", "docker-archive")
BUILD_SECTIONS = ("setup", "files", "post", "pre")
DEFAULT_REQUIRED = ("environment", "runscript", "test", "labels", "help")


@dataclass
class Section:
    name: str  # lower case, as Apptainer treats it
    app: str | None  # the app of a %app* section
    args: str  # anything after the name (and app) on the section line
    line: int  # 1-based line of the `%name` line
    body: str  # the lines after it, verbatim


@dataclass
class Definition:
    path: str
    header: dict[str, tuple[str, int]] = field(default_factory=dict)  # keyword -> (value, line)
    sections: list[Section] = field(default_factory=list)
    problems: list[tuple[int, str]] = field(default_factory=list)

    def section(self, name: str) -> Section | None:
        return next((s for s in self.sections if s.name == name and s.app is None), None)


def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word.lower(), [c.lower() for c in choices], n=1)
    if not close:
        return ""
    return f" (did you mean {next(c for c in choices if c.lower() == close[0])!r}?)"


def _is_section_line(line: str) -> bool:
    """Apptainer starts a section at any line whose first word starts with '%', even indented."""
    words = line.split()
    return bool(words) and words[0].startswith("%")


def parse(text: str, path: str = "<definition>") -> Definition:
    """Split into header and sections, recording structural problems (not policy) on the way."""
    definition = Definition(path)
    lines = text.splitlines()
    if not any(line.strip() and not line.strip().startswith("#") for line in lines):
        definition.problems.append((1, "empty definition file"))
        return definition
    first_section = next((i for i, line in enumerate(lines) if _is_section_line(line)), len(lines))
    _parse_header(lines[:first_section], definition)
    current: Section | None = None
    body: list[str] = []
    for index in range(first_section, len(lines)):
        line = lines[index]
        if _is_section_line(line):
            if current is not None:
                current.body = "\n".join(body)
                definition.sections.append(current)
            current, body = _parse_section_line(line, index + 1, definition), []
        elif re.match(r"(?i)bootstrap:", line):  # Apptainer splits stages here
            definition.problems.append(
                (
                    index + 1,
                    "a second 'Bootstrap:' starts another build stage; keep one stage (build "
                    "multi-stage environments in the Dockerfile)",
                )
            )
        else:
            body.append(line)
    if current is not None:
        current.body = "\n".join(body)
        definition.sections.append(current)
    return definition


def _parse_header(lines: list[str], definition: Definition) -> None:
    continued: tuple[str, str, int] | None = None  # keyword, value so far, line
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        line = line.split("#", 1)[0].rstrip()  # Apptainer drops comments after a header value too
        if continued is not None:
            key, value, first_line = continued
            value += line
        else:
            if ":" not in line:
                definition.problems.append(
                    (number, f"header line {raw.strip()!r} is not 'Keyword: value' (and no section started)")
                )
                continue
            key, _, value = line.partition(":")
            key, value, first_line = key.strip().lower(), value.strip(), number
        if value.endswith("\\"):
            continued = (key, value[:-1], first_line)
            continue
        continued = None
        known = key in HEADER_KEYWORDS or (re.fullmatch(r"otherurl\d+", key) is not None)
        if not known:
            definition.problems.append(
                (
                    first_line,
                    f"unknown header keyword {key!r}{_suggest(key, list(HEADER_KEYWORDS.values()))}; "
                    f"Apptainer accepts {', '.join(HEADER_KEYWORDS.values())}",
                )
            )
            continue
        if key in definition.header:
            definition.problems.append(
                (
                    first_line,
                    f"header keyword {HEADER_KEYWORDS.get(key, key)!r} given twice "
                    f"(first on line {definition.header[key][1]})",
                )
            )
            continue
        definition.header[key] = (value, first_line)
    if continued is not None:
        definition.problems.append((continued[2], "header value ends with '\\' but nothing follows"))


def _parse_section_line(line: str, number: int, definition: Definition) -> Section:
    words = line.split()
    name = words[0][1:].lower()
    rest = words[1:]
    if not name:
        definition.problems.append((number, "a lone '%' is not a section name"))
    elif name in APP_SECTIONS:
        if not rest:
            definition.problems.append((number, f"%{name} needs an app name, e.g. '%{name} myapp'"))
            return Section(name, "", "", number, "")
        return Section(name, rest[0], " ".join(rest[1:]), number, "")
    elif name not in SECTIONS:
        known = [f"%{s}" for s in SECTIONS] + [f"%{s}" for s in APP_SECTIONS]
        definition.problems.append(
            (
                number,
                f"unknown section %{name}{_suggest('%' + name, known)}; Apptainer refuses to build; "
                f"known sections: {' '.join(known)}",
            )
        )
    return Section(name, None, " ".join(rest), number, "")


def check(
    definition: Definition,
    image: str | None = None,
    required: tuple[str, ...] = DEFAULT_REQUIRED,
    allow_build_sections: bool = False,
    shell_check: bool = True,
) -> list[tuple[int, str]]:
    """All problems of a parsed definition: structural ones from `parse` plus this project's policy."""
    problems = list(definition.problems)
    if definition.problems and not definition.sections and not definition.header:
        return problems
    _check_header(definition, image, problems)
    _check_sections(definition, required, allow_build_sections, shell_check, problems)
    return sorted(problems)


def _check_header(definition: Definition, image: str | None, problems: list[tuple[int, str]]) -> None:
    bootstrap, bootstrap_line = definition.header.get("bootstrap", ("", 1))
    source, source_line = definition.header.get("from", ("", bootstrap_line))
    if "bootstrap" not in definition.header:
        problems.append((1, "no 'Bootstrap:' header; use 'Bootstrap: docker-daemon' (or docker-archive)"))
    elif bootstrap not in THIN_BOOTSTRAPS:
        problems.append(
            (
                bootstrap_line,
                f"Bootstrap: {bootstrap}: must be one of {', '.join(THIN_BOOTSTRAPS)}, so the "
                "Apptainer image is built from the Docker image the Dockerfile produces and every dependency "
                "is defined once, in the Dockerfile",
            )
        )
    if "from" not in definition.header or not source:
        problems.append((source_line, "no 'From:' header naming the Docker image (or archive) to build from"))
        return
    if bootstrap == "docker-daemon":
        name, _, tag = source.rpartition(":")
        if not name or not tag or "/" in tag:
            problems.append(
                (
                    source_line,
                    f"From: {source}: docker-daemon needs NAME:TAG of an image in the local "
                    "Docker engine, e.g. zoobot-hpc:latest",
                )
            )
        elif image is not None and source != image:
            problems.append(
                (
                    source_line,
                    f"From: {source} is not the image the Dockerfile is built as ({image}); "
                    f"change it to 'From: {image}'",
                )
            )
    elif bootstrap == "docker-archive" and not re.search(r"\.tar(\.gz)?$", source.split(":")[0]):
        problems.append(
            (
                source_line,
                f"From: {source}: docker-archive needs the file written by `docker save IMAGE -o FILE.tar`",
            )
        )


def _check_sections(
    definition: Definition,
    required: tuple[str, ...],
    allow_build_sections: bool,
    shell_check: bool,
    problems: list[tuple[int, str]],
) -> None:
    seen: dict[tuple[str, str | None], int] = {}
    for section in definition.sections:
        key = (section.name, section.app)
        label = f"%{section.name}" + (f" {section.app}" if section.app else "")
        if key in seen and section.name != "files":
            problems.append(
                (
                    section.line,
                    f"{label} appears twice (also on line {seen[key]}); Apptainer would "
                    "concatenate them, merge them into one",
                )
            )
        seen.setdefault(key, section.line)
        if section.name in BUILD_SECTIONS and not allow_build_sections:
            problems.append(
                (
                    section.line,
                    f"{label}: this definition is a thin wrapper around the Docker image; "
                    "install and copy things in the Dockerfile instead",
                )
            )
        if section.name == "labels" or section.name == "applabels":
            _check_labels(section, problems)
        if shell_check and (section.name in SHELL_SECTIONS or section.name in SHELL_APP_SECTIONS):
            _check_shell(section, label, problems)
    for name in required:
        section = definition.section(name)
        if section is None:
            problems.append((1, f"the %{name} section is missing"))
        elif not _code_lines(section.body):
            problems.append((section.line, f"the %{name} section is empty"))
    runscript = definition.section("runscript")
    if runscript is not None and _code_lines(runscript.body) and '"$@"' not in runscript.body:
        problems.append(
            (runscript.line, '%runscript does not pass its arguments on: use "$@", e.g. exec zoobot-hpc "$@"')
        )


def _code_lines(body: str) -> list[str]:
    return [line for line in body.splitlines() if line.strip() and not line.strip().startswith("#")]


def _check_labels(section: Section, problems: list[tuple[int, str]]) -> None:
    for offset, line in enumerate(section.body.splitlines(), start=1):
        text = line.strip()
        if text and not text.startswith("#") and len(text.split(None, 1)) < 2:
            problems.append((section.line + offset, f"label {text!r} has no value; write 'KEY VALUE'"))


def _check_shell(section: Section, label: str, problems: list[tuple[int, str]]) -> None:
    shell = shutil.which("sh")
    if shell is None or not _code_lines(section.body):
        return
    result = subprocess.run([shell, "-n"], input=section.body + "\n", capture_output=True, text=True)
    if result.returncode != 0:
        message = " ".join(result.stderr.split()) or f"sh -n exited with {result.returncode}"
        problems.append((section.line, f"{label} is not valid sh: {message}"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("definition", help="the definition file, e.g. apptainer.def")
    parser.add_argument("--image", help="the tag the Dockerfile is built as; From: must name it")
    parser.add_argument(
        "--require",
        default=",".join(DEFAULT_REQUIRED),
        help="comma-separated sections that must exist and not be empty (default: %(default)s)",
    )
    parser.add_argument(
        "--allow-build-sections",
        action="store_true",
        help="accept %%setup, %%files, %%post and %%pre (refused by default: thin wrapper)",
    )
    parser.add_argument(
        "--section",
        metavar="NAME",
        help="print the body of section NAME (e.g. test, runscript, environment) instead of checking",
    )
    args = parser.parse_args(argv)
    path = Path(args.definition)
    try:
        text = path.read_text()
    except OSError as err:
        print(f"{path}: cannot read: {err.strerror}", file=sys.stderr)
        return 1
    definition = parse(text, str(path))
    if args.section:
        section = definition.section(args.section.lstrip("%").lower())
        if section is None:
            print(f"{path}: no %{args.section.lstrip('%')} section", file=sys.stderr)
            return 1
        sys.stdout.write(section.body.rstrip("\n") + "\n")
        return 0
    required = tuple(s.strip().lstrip("%").lower() for s in args.require.split(",") if s.strip())
    problems = check(definition, args.image, required, args.allow_build_sections)
    for line, message in problems:
        print(f"{path}:{line}: {message}", file=sys.stderr)
    if problems:
        print(f"{path}: {len(problems)} problem(s)", file=sys.stderr)
        return 1
    bootstrap = definition.header["bootstrap"][0]
    source = definition.header["from"][0]
    names = " ".join(f"%{s.name}" + (f" {s.app}" if s.app else "") for s in definition.sections)
    print(f"{path}: ok (Bootstrap: {bootstrap}, From: {source}; sections {names})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
