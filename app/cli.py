"""The `parley` command: dev, api, worker, io-worker, beat, migrate, keys, model, export.

Commands that need the model stack run it in a child process (`python -m worker...`), so
that this module, shared with the API, never imports torch or the worker (invariant 5).
Each command imports what only it uses when it runs: `parley api` and the workers start
without loading the others' packages (the embedded servers of `parley dev` are not in the
images, for one).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from app.config import get_settings
from app.migrate import upgrade_database
from celeryconfig import MAINTENANCE_QUEUE, WEBHOOKS_QUEUE

cli = typer.Typer(
    help="Parley: a queue-backed asynchronous job API for multi-turn chat.",
    no_args_is_help=True,
    add_completion=False,
)
keys_cli = typer.Typer(help="Manage API keys.", no_args_is_help=True)
model_cli = typer.Typer(help="Build local models.", no_args_is_help=True)
cli.add_typer(keys_cli, name="keys")
cli.add_typer(model_cli, name="model")


HostOption = Annotated[str, typer.Option(help="Interface to listen on.")]
PortOption = Annotated[int, typer.Option(help="Port to listen on.")]


@cli.command()
def migrate() -> None:
    """Apply the database migrations (safe to run again)."""
    upgrade_database()
    typer.echo("database is at the newest schema")


@cli.command()
def api(
    host: HostOption = "127.0.0.1",
    port: PortOption = 8000,
    processes: Annotated[
        int,
        typer.Option(
            min=1,
            envvar="API_PROCESSES",
            help="Processes serving the port (the API keeps no state of its own: any number).",
        ),
    ] = 1,
) -> None:
    """Run the HTTP API."""
    import uvicorn

    # Requests are logged by Parley's own middleware, with their request ids.
    uvicorn.run(
        "app.main:create_app",
        factory=True,
        host=host,
        port=port,
        workers=processes,
        log_level=os.environ.get("LOG_LEVEL", "info").lower(),
        access_log=False,
        proxy_headers=True,
    )


@cli.command()
def worker(
    gpus: Annotated[str, typer.Option(help="auto, cpu, or GPU indexes such as 0,1")] = "auto",
    no_restart: Annotated[
        bool,
        typer.Option(
            "--no-restart",
            help="Run the one worker in this process's place, with no supervisor to restart "
            "it (for systemd, Kubernetes or another manager that restarts it).",
        ),
    ] = False,
    name: Annotated[str | None, typer.Option(help="The worker's name in Celery.")] = None,
) -> None:
    """Run the model workers: one process per GPU, or one on the CPU."""
    command = [sys.executable, "-m", "worker.gpus", "--gpus", gpus]
    command += ["--no-restart"] if no_restart else []
    command += ["--name", name] if name else []
    # Replaces this process with the launcher; no shell is involved.
    os.execv(sys.executable, command)  # noqa: S606


@cli.command("io-worker")
def io_worker(
    concurrency: Annotated[int, typer.Option(min=1, help="Deliveries at once (threads).")] = 32,
    name: Annotated[str, typer.Option(help="The worker's name in Celery.")] = "parley-io",
) -> None:
    """Run the I/O worker: webhook deliveries and their retry sweep, and maintenance tasks. It
    never loads the model and needs no GPU; run one or more wherever the database and the
    broker can be reached."""
    command = [sys.executable, "-m", "celery", "-A", "worker.io_worker.celery_app", "worker"]
    command += ["--pool", "threads", "--concurrency", str(concurrency)]
    command += ["--queues", f"{WEBHOOKS_QUEUE},{MAINTENANCE_QUEUE}", "--hostname", f"{name}@%h"]
    command += ["--without-gossip", "--without-mingle"]
    command += ["--loglevel", os.environ.get("LOG_LEVEL", "INFO")]
    os.execv(sys.executable, command)  # noqa: S606


@cli.command()
def dev(host: HostOption = "127.0.0.1", port: PortOption = 8000) -> None:
    """Run the API, one worker and what they need, in the foreground (Ctrl-C stops it all)."""
    from app.dev.run import run_dev

    raise typer.Exit(run_dev(host=host, port=port))


@cli.command()
def beat(
    data_dir: Annotated[Path, typer.Option(help="Where the schedule's state is kept.")] = Path(
        ".parley"
    ),
) -> None:
    """Run the scheduler of periodic tasks (Celery beat): transcript retention. Run exactly one."""
    data_dir.mkdir(parents=True, exist_ok=True)
    # The I/O worker's app: beat imports the apps' task modules, and the model worker's would
    # load torch for nothing.
    command = [sys.executable, "-m", "celery", "-A", "worker.io_worker.celery_app", "beat"]
    command += ["--schedule", str(data_dir / "celerybeat-schedule")]
    command += ["--loglevel", os.environ.get("LOG_LEVEL", "INFO")]
    os.execv(sys.executable, command)  # noqa: S606


@cli.command("export")
def export_transcripts(
    output: Annotated[Path, typer.Option("--output", "-o", help="The JSONL file to write.")],
    tenant: Annotated[str | None, typer.Option(help="Only this tenant.")] = None,
    q: Annotated[str | None, typer.Option(help="Search text, as in the admin API.")] = None,
    since: Annotated[str | None, typer.Option(help="Created at or after (ISO 8601).")] = None,
    until: Annotated[str | None, typer.Option(help="Created before (ISO 8601).")] = None,
    status: Annotated[str | None, typer.Option(help="Status of the last job.")] = None,
) -> None:
    """Export conversations to a JSONL file, one a line: {"messages": [...], ...}."""
    from app.admin.export_file import BadFilter, export_to_file, parse_filter

    try:
        filters = parse_filter(tenant=tenant, q=q, since=since, until=until, status=status)
    except BadFilter as exc:
        typer.echo(f"parley export: {exc}", err=True)
        raise typer.Exit(2) from None
    export_to_file(filters, output)


@keys_cli.command("create")
def keys_create(
    tenant: Annotated[str, typer.Option(help="The tenant the key belongs to.")],
    admin: Annotated[bool, typer.Option("--admin", help="An admin (operator) key.")] = False,
    name: Annotated[str, typer.Option(help="A label for the key.")] = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Create an API key and print it (it is shown only once)."""
    from pydantic import ValidationError

    from app.auth.schemas import KeyCreate
    from app.auth.service import create_key
    from app.db import session_scope
    from app.models import Scope

    try:
        request = KeyCreate(tenant=tenant, scope="admin" if admin else "client", name=name)
    except ValidationError as exc:
        typer.echo(f"invalid key request: {exc.errors()[0]['msg']}", err=True)
        raise typer.Exit(2) from None
    with session_scope() as session:
        key, secret = create_key(
            session, tenant_id=request.tenant, scope=Scope(request.scope), name=request.name
        )
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "id": key.id,
                    "key": secret,
                    "tenant": key.tenant_id,
                    "scope": key.scope,
                    "name": key.name,
                }
            )
        )
    else:
        typer.echo(secret)


@model_cli.command("init")
def model_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the model.")],
    size: Annotated[str, typer.Option(help="tiny (tests) or small (GPT-2 small's shape)")] = "tiny",
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
) -> None:
    """Build a model locally from a fixed seed (no download): a byte-level BPE tokenizer
    trained on bundled text and random GPT-2 weights."""
    if size not in ("tiny", "small"):
        typer.echo("--size is tiny or small", err=True)
        raise typer.Exit(2)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "worker.inference.model_init",
            str(directory),
            "--size",
            size,
            "--seed",
            str(seed),
        ],
        check=False,
    )
    raise typer.Exit(result.returncode)


def main() -> None:
    get_settings.cache_clear()
    cli()


if __name__ == "__main__":
    main()
