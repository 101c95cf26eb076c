"""A real federation on this machine: one SuperLink and N SuperNodes as separate processes,
on loopback, with TLS and SuperNode authentication, all stopped by pid when done.

What it does, in the order docs/deployment.md describes for separate machines:
1. writes a CA and a server certificate for 127.0.0.1 / localhost, and one ECDSA key pair
   per SuperNode (deploy/credentials.py);
2. starts `flower-superlink` with TLS and `--enable-supernode-auth` on a free port, and
   waits until it answers on /health;
3. names the federation in a private $FLWR_HOME/config.toml and registers every node's
   public key (`flwr supernode register`);
4. starts one `flower-supernode` per key, each with its own Runtime API port and its own
   `--node-config "partition-id=i num-partitions=N"` (plus `data-path` with --data-dir),
   and waits until the SuperLink lists them all online;
5. runs the app (`flwr run <project> <federation>`), streams its log (`flwr log`), and
   when it ends compares Flower's network traffic (`flwr list --format json`) with the
   bytes the strategy counted (summary.json), writing both to deploy_summary.json;
6. stops every process it started (SuperNodes first, then the SuperLink), by pid and with
   everything below it, on normal exit, on an exception, on Ctrl-C and on SIGTERM. A
   Ctrl-C during a run first asks the SuperLink to stop the run (`flwr stop`).

    python -m deploy.local_federation --num-supernodes 3 \
        --run-config "model='small-cnn' cost-profile='paper-uniform' num-server-rounds=3 \
                      clients-per-round=3 ip-max-iterations=100"
    python -m deploy.local_federation --num-supernodes 3 --no-run   # then try flwr by hand

It lives in deploy/ with the credential tool rather than in experiments/: it is an
operations tool (certificates, keys, processes), not an experiment, and nothing in it
is part of the app the SuperLink ships to the nodes.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deploy.credentials import LOOPBACK_HOSTS, generate_tls
from deploy.federation import (
    PROJECT_DIR,
    REFUSED_EXIT_CODE,
    Federation,
    RunOutcome,
    SuperNode,
    compare_traffic,
    default_node_configs,
    federation_toml,
    spawn,
    superlink_command,
    wait_https_health,
    write_deploy_summary,
)
from experiments.local_run import QUIET_ENV, free_port, raise_on_sigterm, tool_env

FEDERATION = "local-tls"
LocalFederation = Federation  # the name this module's users knew it by

__all__ = [
    "FEDERATION",
    "PROJECT_DIR",
    "REFUSED_EXIT_CODE",
    "LocalFederation",
    "RunOutcome",
    "SuperNode",
    "compare_traffic",
    "local_federation",
    "write_deploy_summary",
]


@contextlib.contextmanager
def local_federation(
    num_supernodes: int = 3,
    workdir: Path | None = None,
    data_dir: Path | None = None,
    node_configs: list[str] | None = None,
    project_dir: Path = PROJECT_DIR,
    startup_timeout_s: float = 120.0,
    warm_clientapp: bool = True,
) -> Iterator[Federation]:
    """Start a SuperLink and `num_supernodes` registered SuperNodes; stop them all on exit.
    Their ClientApp processes start warm (deploy/warm_clientapp.py) unless
    `warm_clientapp` is False.

    Node i gets `--node-config "partition-id=i num-partitions=N"`; with `data_dir` also
    `data-path="data_dir/partition-<i>"` (folders written by `python -m
    clients.prepare_data`), so it reads that folder instead of its partition of the
    embedded data. `node_configs` (one string per node) replaces all of that.
    """
    if node_configs is not None and len(node_configs) != num_supernodes:
        raise ValueError(f"{len(node_configs)} node configs for {num_supernodes} SuperNodes")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="fed-")))
        workdir = Path(workdir).resolve()
        workdir.mkdir(parents=True, exist_ok=True)
        tls = generate_tls(workdir / "certificates", LOOPBACK_HOSTS)
        port = free_port()
        link_home, cli_home = workdir / "superlink", workdir / "flwr-cli"
        link_home.mkdir(exist_ok=True)
        cli_home.mkdir(exist_ok=True)
        (cli_home / "config.toml").write_text(
            federation_toml(FEDERATION, f"127.0.0.1:{port}", tls["ca_cert"])
        )
        cli_env = tool_env({**os.environ, **QUIET_ENV, "FLWR_HOME": str(cli_home)})
        link_env = tool_env({**os.environ, **QUIET_ENV, "FLWR_HOME": str(link_home)})
        log = link_home / "superlink.log"
        cmd = superlink_command(tls, "127.0.0.1", port, link_home / "state.db")
        link = spawn(cmd, link_env, project_dir, log)
        fed = Federation(
            workdir,
            project_dir,
            f"127.0.0.1:{port}",
            tls["ca_cert"],
            cli_env,
            link,
            [],
            FEDERATION,
            seen_pids={link.pid},
            warm_clientapp=warm_clientapp,
        )
        try:
            wait_https_health(link, port, tls["ca_cert"], startup_timeout_s, log)
            for config in node_configs or default_node_configs(num_supernodes, data_dir):
                fed.add_supernode(config)
            for node in fed.supernodes:
                fed.start_supernode(node)
            fed.wait_nodes({n.node_id: "online" for n in fed.supernodes}, startup_timeout_s)
            yield fed
        finally:
            fed.stop()


# ---------------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=3)
    parser.add_argument(
        "--run-config", default="", help='app settings, e.g. "num-server-rounds=5 seed=1"'
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        help="node i reads DATA_DIR/partition-<i> (python -m clients.prepare_data)",
    )
    parser.add_argument("--output-dir", type=Path, default=Path("outputs"))
    parser.add_argument("--run-name", default="", help="default: deploy-<date>-<time>")
    parser.add_argument(
        "--workdir",
        type=Path,
        help="certificates, keys, FLWR_HOMEs and logs (default: a temporary folder, "
        "removed at the end)",
    )
    parser.add_argument(
        "--no-run",
        action="store_true",
        help="start the federation, print how to use it, and wait for Ctrl-C",
    )
    parser.add_argument("--timeout-s", type=float, default=3600.0)
    parser.add_argument(
        "--cold-clientapp",
        action="store_true",
        help="Flower's own ClientApp starts (a fresh process that imports everything, per "
        "message) instead of forking them warm (deploy/warm_clientapp.py)",
    )
    args = parser.parse_args(argv)

    signal.signal(signal.SIGTERM, raise_on_sigterm)
    # Ctrl-C raises KeyboardInterrupt even when this process was started with SIGINT
    # ignored (a background job of a non-interactive shell), where Python leaves it so.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    run_name = args.run_name or time.strftime("deploy-%Y%m%d-%H%M%S")
    out_root = args.output_dir.resolve()
    try:
        with local_federation(
            args.num_supernodes,
            args.workdir,
            args.data_dir,
            warm_clientapp=not args.cold_clientapp,
        ) as fed:
            print(
                f"[deploy] SuperLink https://{fed.address} (pid {fed.superlink.pid}); "
                f"{len(fed.supernodes)} SuperNodes online: "
                + ", ".join(f"{n.node_id} (pid {n.process.pid})" for n in fed.supernodes),
                flush=True,
            )
            if args.no_run:
                print(
                    "[deploy] federation "
                    f"{fed.name!r} is up. In another shell:\n"
                    f"  export FLWR_HOME={fed.env['FLWR_HOME']}\n"
                    f"  flwr run {fed.project_dir} {fed.name} --stream\n"
                    f"  flwr list {fed.name} --format json\n"
                    "Ctrl-C here stops everything.",
                    flush=True,
                )
                while True:
                    time.sleep(3600)
            # Nodes authenticate with registered keys: bind each client id to its node.
            ours = f"output-dir='{out_root}' run-name='{run_name}' node-auth=true"
            outcome = fed.run([args.run_config, ours], timeout_s=args.timeout_s)
            print(f"[deploy] run {outcome.run_id}: {outcome.status}", flush=True)
            if outcome.status != "finished:completed":
                return 1
            comparison = write_deploy_summary(
                out_root / run_name,
                outcome.run,
                {"num_supernodes": args.num_supernodes, "tls": True, "node_auth": True},
            )
            _print_comparison(comparison, out_root / run_name)
            return 0
    except KeyboardInterrupt:
        print("[deploy] interrupted; all processes stopped", file=sys.stderr)
        return 130


def _print_comparison(c: dict[str, Any], out_dir: Path) -> None:
    f, s, r = c["flower_network_traffic"], c["strategy_bytes"], c["flower_over_strategy"]
    print(
        "[deploy] bytes      Flower (flwr list)   strategy (summary.json)   difference\n"
        f"[deploy] down    {f['outbound_bytes']:>18,}   {s['down']:>23,}   {r['down']:+.1%}\n"
        f"[deploy] up      {f['inbound_bytes']:>18,}   {s['up']:>23,}   {r['up']:+.1%}\n"
        f"[deploy] total   {f['total_bytes']:>18,}   {s['total']:>23,}   {r['total']:+.1%}\n"
        f"[deploy] written to {out_dir / 'deploy_summary.json'} and summary.json",
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
