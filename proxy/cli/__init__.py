"""The `llm-gateway` command line (`python -m proxy.cli` works too).

Lives here: `main` (argument parsing and the commands), `serve` (uvicorn options shared by `serve`
and `demo`), `demo` (gateway plus simulated providers in one process) and `limits` (the live-limit
commands).

May import: everything else in the project (the CLI is the top of the dependency order); nothing
imports the CLI.
"""
