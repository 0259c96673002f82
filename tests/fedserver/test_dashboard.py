"""The dashboard as a module: its JSON API, /metrics, what it refuses (methods, tokens, hosts,
addresses), and the status document it shares with `fedserver status --json`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import TestClient

from fedserver.cli import main
from fedserver.control import NodeInfo
from fedserver.dashboard import Dashboard, DashboardError, RunModel, dashboard_address, read_names, read_token
from fedserver.dashboard.server import COOKIE, build_app
from fedserver.events import NodeReply, RoundEvent
from fedserver.privacy import PrivateRoundEvent
from fedserver.state import DaemonInfo, StateDir
from fedserver.status import build_status, collect
from shared.pki import init_pki

TOKEN = "s3cret-token-0123456789"
RUN = {"dataset": "synthetic", "model": "mlp", "strategy": "fedavg", "num_clients": 3, "clients_per_round": 2,
       "rounds": 4, "secure_aggregation": True, "secagg_threshold": 2, "secagg_neighbours": 2, "dp": "central",
       "dp_target_epsilon": 8.0, "dp_delta": 1e-5}  # fmt: skip


def round_event(n: int, epsilon: float | None = None) -> RoundEvent:
    """Round n of 4: node 1 accepted (0.5 s), node 2 refused by its policy, node 3 screened out."""
    replies = (NodeReply(1, "train", "accepted", None, 0.5), NodeReply(2, "train", "refused", 110, 0.25),
               NodeReply(3, "train", "screened", None, 0.75))  # fmt: skip
    event = RoundEvent(n, 4, train_loss=1.0 / n, eval_loss=0.9 / n, accuracy=0.5 + 0.1 * n, seconds=2.0, replies=replies)
    return event if epsilon is None else PrivateRoundEvent(**vars(event), epsilon=epsilon)


def fed_dashboard(kind: str = "simulation", rounds: int = 2, **options: object) -> Dashboard:
    dashboard = Dashboard(RunModel(kind, dict(RUN)), port=0, **options)  # type: ignore[arg-type]
    for n in range(1, rounds + 1):
        dashboard.subscriber(round_event(n, epsilon=0.5 * n))
    return dashboard


def client(dashboard: Dashboard) -> TestClient:
    app = build_app(dashboard.model, dashboard.token, dashboard.names, dashboard.metrics(),
                    loopback_only=dashboard.token is None)  # fmt: skip
    return TestClient(app, base_url="http://127.0.0.1:8092")


def test_the_api_serves_status_rounds_and_nodes_from_the_round_events():
    api = client(fed_dashboard())

    status, rounds, nodes = (api.get(path).json() for path in ("/api/status", "/api/rounds?since=1", "/api/nodes"))

    assert (status["kind"], status["rounds_completed"], status["rounds"]) == ("simulation", 2, 4)
    assert status["last_metrics"] == {"round": 2, "train_loss": 0.5, "eval_loss": 0.45, "accuracy": 0.7,
                                      "seconds": 2.0, "epsilon": 1.0, "stopped": None}  # fmt: skip
    assert status["privacy"] == {"dp": "central", "epsilon": 1.0, "target_epsilon": 8.0, "delta": 1e-5, "stopped": None}
    assert status["secure_aggregation"] == {"threshold": 2, "neighbours": 2, "last_round_accepted": 1}
    assert status["elapsed_seconds"] == 4.0 and status["seconds_per_round"] == 2.0
    assert [r["round"] for r in rounds["rounds"]] == [2]
    assert rounds["rounds"][0]["replies"] == {"accepted": 1, "screened": 1, "refused": 1, "failed": 0}
    by_id = {n["node_id"]: n for n in nodes["nodes"]}
    assert by_id[1]["rounds_taken_part"] == 2 and by_id[1]["seconds_per_reply"] == 0.5 and by_id[1]["refused"] == []
    assert by_id[2]["refused"] == [{"outcome": "refused", "code": 110, "count": 2,
                                    "reason": "refused by the device's policy: secure aggregation is required"}]  # fmt: skip
    assert by_id[3]["refused"][0]["outcome"] == "screened" and by_id[3]["accepted"] == 0


def test_nodes_are_ids_unless_the_operator_names_them(tmp_path):
    model = RunModel("deployment", dict(RUN))
    model.set_superlink_nodes([NodeInfo(7, "alice-phone", "online", "t0", online_until=100.0, heartbeat_interval=30.0),
                               NodeInfo(8, "bob-phone", "offline", "t0")])  # fmt: skip
    names_file = tmp_path / "names.toml"
    names_file.write_text('7 = "ward 7"\n')

    anonymous = client(Dashboard(model, port=0)).get("/api/nodes").json()["nodes"]
    named = client(Dashboard(model, port=0, names=read_names(names_file))).get("/api/status").json()

    assert [(n["node_id"], n["name"], n["connected"], n["last_seen"]) for n in anonymous] == [
        (7, None, True, 70.0), (8, None, False, None)
    ]  # fmt: skip
    assert named["nodes"] == [{"node_id": 7, "name": "ward 7", "status": "online"},
                              {"node_id": 8, "name": None, "status": "offline"}]  # fmt: skip
    assert named["connected_nodes"] == 1
    assert "phone" not in json.dumps(named)


def test_nodes_can_be_limited_to_those_seen_last():
    dashboard = fed_dashboard()
    dashboard.model.add({"round": 3, "replies": [{"node_id": 9, "task": "train", "outcome": "accepted"}]}, at=1e10)

    shown = client(dashboard).get("/api/nodes?limit=1").json()

    assert shown["total"] == 4 and [n["node_id"] for n in shown["nodes"]] == [9]


def test_metrics_parse_with_prometheus_client_and_follow_the_rounds():
    dashboard = fed_dashboard(rounds=3)

    families = {f.name: f for f in text_string_to_metric_families(client(dashboard).get("/metrics").text)}

    def value(name: str, **labels: str) -> float:
        return next(s.value for s in families[name].samples if all(s.labels.get(k) == v for k, v in labels.items()))

    assert value("flowerbed_round") == 3 and value("flowerbed_rounds_planned") == 4
    assert value("flowerbed_accuracy") == pytest.approx(0.8) and value("flowerbed_eval_loss") == pytest.approx(0.3)
    assert value("flowerbed_round_seconds") == 2.0 and value("flowerbed_epsilon") == 1.5
    assert value("flowerbed_replies_received") == 9
    assert value("flowerbed_replies_refused", outcome="refused", code="110") == 3
    assert value("flowerbed_replies_refused", outcome="screened", code="") == 3
    assert value("flowerbed_devices_connected") == 3  # a simulation's virtual nodes


def test_each_dashboard_has_its_own_registry():
    first, second = fed_dashboard(rounds=1), fed_dashboard(rounds=3)

    rounds = [next(text_string_to_metric_families(client(d).get("/metrics").text)).samples[0].value for d in (first, second)]

    assert rounds == [1, 3]


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH"])
@pytest.mark.parametrize("path", ["/api/status", "/metrics", "/", "/nowhere"])
def test_nothing_but_get_is_served(method, path):
    response = client(fed_dashboard()).request(method, path)

    assert response.status_code == 405 and response.headers["allow"] == "GET, HEAD"


def test_a_token_is_asked_for_and_a_query_token_sets_a_cookie():
    api = client(fed_dashboard(token=TOKEN))

    refused = [api.get("/api/status").status_code, api.get("/metrics", headers={"Authorization": "Bearer wrong"}).status_code,
               api.get(f"/api/status?token={TOKEN}x").status_code]  # fmt: skip
    by_header = api.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    page = api.get(f"/?token={TOKEN}")
    by_cookie = api.get("/api/rounds")  # the cookie the page's URL set

    assert refused == [401, 401, 401]
    assert by_header.status_code == page.status_code == by_cookie.status_code == 200
    assert page.cookies[COOKIE] == TOKEN and "httponly" in page.headers["set-cookie"].lower()


def test_without_a_token_only_this_machine_s_host_names_are_served():
    api = client(fed_dashboard())

    codes = [api.get("/api/status", headers={"Host": host}).status_code
             for host in ("127.0.0.1:8092", "localhost:8092", "[::1]:8092", "evil.example:8092")]  # fmt: skip

    assert codes == [200, 200, 200, 421]


def test_the_page_and_its_files_come_from_the_package_with_a_strict_policy():
    api = client(fed_dashboard())

    page, script, style = api.get("/"), api.get("/dashboard.js"), api.get("/dashboard.css")

    assert 'id="round"' in page.text and 'src="/dashboard.js"' in page.text and "http" not in page.text.split("<body>")[0]
    assert script.headers["content-type"].startswith("text/javascript") and "textContent" in script.text
    assert style.status_code == 200
    assert "default-src 'none'" in page.headers["content-security-policy"]


def test_an_address_off_loopback_needs_a_token(tmp_path):
    with pytest.raises(DashboardError, match="needs --dashboard-token-file"):
        Dashboard(RunModel("simulation"), host="0.0.0.0", port=0)

    assert Dashboard(RunModel("simulation"), host="0.0.0.0", port=0, token=TOKEN).token == TOKEN  # not started


@pytest.mark.parametrize(("text", "expected"), [("8093", ("127.0.0.1", 8093)), ("0", ("127.0.0.1", 0)),
                                                ("0.0.0.0:9000", ("0.0.0.0", 9000)), ("[::1]:0", ("::1", 0))])  # fmt: skip
def test_dashboard_addresses(text, expected):
    assert dashboard_address(text) == expected


@pytest.mark.parametrize("text", ["", "host:", "127.0.0.1:99999", "a b:80"])
def test_a_bad_dashboard_address_is_a_one_line_error(text):
    with pytest.raises(DashboardError, match="--dashboard"):
        dashboard_address(text)


def test_the_token_file_must_be_private_and_long_enough(tmp_path):
    token = tmp_path / "token"
    token.write_text(TOKEN + "\n")
    token.chmod(0o640)
    with pytest.raises(DashboardError, match="readable by others"):
        read_token(token)
    token.chmod(0o600)
    assert read_token(token) == TOKEN
    token.write_text("short")
    with pytest.raises(DashboardError, match="16 or more"):
        read_token(token)


def test_a_names_file_maps_node_ids_only(tmp_path):
    names = tmp_path / "names.toml"
    names.write_text('alice = "x"\n')

    with pytest.raises(DashboardError, match="NODE_ID"):
        read_names(names)


def test_a_busy_port_is_a_one_line_error_at_start():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        dashboard = Dashboard(RunModel("simulation"), port=taken.getsockname()[1])

        with pytest.raises(DashboardError, match="cannot serve the dashboard on 127.0.0.1:"):
            dashboard.start()


def test_a_started_dashboard_serves_on_a_free_port_until_stopped():
    dashboard = fed_dashboard()

    with dashboard:
        served = httpx.get(dashboard.url + "api/status").json()
        port = dashboard.port

    assert served["rounds_completed"] == 2 and port > 0
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{port}/api/status")


def test_fedserver_status_json_is_the_api_s_document_with_its_existing_keys(tmp_path, capsys):
    # Prepare: a stopped daemon's state directory whose ServerApp wrote two round events
    state = StateDir(tmp_path / "state")
    state.create()
    DaemonInfo(999999, "127.0.0.1:9092", "127.0.0.1:9092", "/x/ca.pem", 42, 4).write(state.info)
    lines = [json.dumps({**dict(vars(round_event(n))), "replies": [vars(r) for r in round_event(n).replies]})
             for n in (1, 2)]  # fmt: skip
    (state.run_dir / "events.jsonl").write_text("\n".join(lines) + "\n")

    main(["status", "--state-dir", str(state.root), "--json"])
    printed = json.loads(capsys.readouterr().out)

    model = RunModel("deployment")
    for n in (1, 2):
        model.add(json.loads(lines[n - 1]))
    api_keys = set(json.loads(build_status(model).to_json()))
    existing = {"state_dir", "running", "pid", "address", "run_id", "runs", "nodes", "connected_nodes",
                "rounds_completed", "last_metrics", "devices", "last_run", "error"}  # fmt: skip
    assert existing <= set(printed) and set(printed) == api_keys
    assert printed["rounds_completed"] == 2 and printed["last_metrics"]["accuracy"] == pytest.approx(0.7)
    assert printed["seconds_per_round"] == 2.0 and printed["state"] == "stopped"
    assert collect(state.root).rounds_completed == 2


def test_fedserver_start_refuses_bad_dashboard_flags_before_anything_starts(tmp_path, capsys):
    pki, run_toml = tmp_path / "pki", tmp_path / "run.toml"
    init_pki(pki, clients=1)
    run_toml.write_text('num-clients = 2\nclients-per-round = 2\nrounds = 2\n')
    token = tmp_path / "token"
    token.write_text(TOKEN)
    os.chmod(token, 0o644)
    state = tmp_path / "state"

    codes = [
        main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state), "--dashboard", "nohost:"]),
        main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state), "--dashboard",
              "0.0.0.0:0"]),
        main(["start", "--pki", str(pki), "--config", str(run_toml), "--state-dir", str(state), "--dashboard",
              "0.0.0.0:0", "--dashboard-token-file", str(token)]),
    ]  # fmt: skip

    errors = [line for line in capsys.readouterr().err.splitlines() if line]
    assert codes == [2, 2, 2] and len(errors) == 3
    assert "--dashboard" in errors[0] and "needs --dashboard-token-file" in errors[1] and "readable by others" in errors[2]
    assert not Path(state, "fedserver.pid").exists()


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        (["--app", "some/dir", "--dashboard", "0"], "a Flower app (--app) tells none"),
        (["--dashboard-names", "names.toml"], "go with --dashboard"),
        (["--dashboard", "0.0.0.0:0"], "needs --dashboard-token-file"),
        (["--dashboard", "nohost:"], "--dashboard"),
    ],
)
def test_fedsim_refuses_a_dashboard_it_cannot_serve_before_anything_is_written(tmp_path, capsys, extra, says):
    from simulations.cli import main as fedsim

    code = fedsim(["run", "--output", str(tmp_path / "run"), *extra])

    error = capsys.readouterr().err
    assert code == 2 and error.count("\n") == 1 and says in error
    assert not (tmp_path / "run").exists()


def test_the_dashboard_and_fedserver_status_import_no_flower():
    # they compare the SuperLink's statuses with shared.flower_compat.superlink's values, not Flower's
    code = "import sys, fedserver.dashboard.server, fedserver.status; print('flwr' in sys.modules)"
    cwd = Path(__file__).resolve().parents[2]
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=cwd).stdout

    assert loaded == "False\n"  # importing Flower would cost each start about half a second
