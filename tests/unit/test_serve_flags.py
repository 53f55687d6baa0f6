"""`tandem serve` shape flags land in the config exactly as pinned by the issue."""

from __future__ import annotations

import json

import pytest

from common.errors import ConfigError
from deploy.cli import build_parser, main
from deploy.serve_cli import config_from_args


def parse(*argv: str):
    return config_from_args(build_parser().parse_args(["serve", *argv]))


def test_shape_flags_set_each_pool():
    cfg = parse(
        "--prefill-tp",
        "2",
        "--prefill-pp",
        "2",
        "--decode-tp",
        "1",
        "--decode-pp",
        "2",
        "--prefill-block-size",
        "16",
        "--decode-block-size",
        "32",
        "--prefill-kv-order",
        "NHD",
        "--decode-kv-order",
        "HND",
    )
    p, d = cfg.prefill, cfg.decode
    assert (p.tp, p.pp, p.block_size, p.kv_order) == (2, 2, 16, "NHD")
    assert (d.tp, d.pp, d.block_size, d.kv_order) == (1, 2, 32, "HND")


def test_defaults_are_one_rank_per_worker():
    cfg = parse()
    assert (cfg.prefill.tp, cfg.prefill.pp, cfg.decode.tp, cfg.decode.pp) == (1, 1, 1, 1)
    assert cfg.prefill.kv_order == cfg.decode.kv_order == "NHD"


def test_device_auto_is_the_default_and_follows_the_ray_cluster():
    cfg = parse().validate()
    assert cfg.prefill.device == cfg.decode.device == "auto"
    on_gpus, on_cpus = cfg.with_devices(8.0), cfg.with_devices(0.0)
    assert (on_gpus.prefill.device, on_gpus.decode.device, on_gpus.decode.gpus) == ("cuda", "cuda", 1.0)
    assert (on_cpus.prefill.device, on_cpus.decode.device, on_cpus.decode.gpus) == ("cpu", "cpu", 0.0)
    one = cfg.with_devices(1.0)  # the default 1 + 1 workers on one GPU: they share it
    assert (one.prefill.device, one.prefill.gpus, one.decode.gpus) == ("cuda", 0.5, 0.5)
    tp2 = parse("--decode-tp", "2").with_devices(2.0)  # 3 ranks, 2 GPUs
    assert (tp2.prefill.gpus, tp2.decode.gpus) == (0.66, 0.66)
    import msgspec

    greedy = msgspec.structs.replace(cfg, prefill=msgspec.structs.replace(cfg.prefill, num_gpus=1.0))
    assert greedy.with_devices(1.5).decode.gpus == 0.5  # what the pinned pool leaves
    with pytest.raises(ConfigError, match="take all 1 GPUs of the Ray cluster and 1 more ranks need one"):
        greedy.with_devices(1.0)
    explicit = parse("--device", "cpu")
    assert explicit.with_devices(8.0) == explicit  # an explicit device is kept on a GPU cluster
    reread = parse().with_devices_of(on_gpus)  # SIGHUP: a re-read "auto" is what the running config resolved
    assert reread == on_gpus
    with pytest.raises(ConfigError, match="prefill.device must be auto, cpu or cuda, got 'gpu'"):
        parse("--device", "gpu").validate()


def test_print_config_shows_the_shape(capsys: pytest.CaptureFixture[str]):
    assert main(["serve", "--decode-tp", "2", "--decode-kv-order", "HND", "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["decode"]["tp"] == 2 and cfg["decode"]["kv_order"] == "HND" and cfg["prefill"]["tp"] == 1


def test_bad_shape_values_are_refused():
    with pytest.raises(ConfigError, match="prefill.tp and prefill.pp must be >= 1"):
        parse("--prefill-tp", "0")
    with pytest.raises(SystemExit):
        parse("--decode-kv-order", "XYZ")


def test_router_flags_as_pinned_by_the_routing_issue():
    from deploy.serve import routing_config
    from router.pools import Policy

    assert parse().router.policy == "kv" and parse().router.conditional_prefill_threshold == 0
    # placement by SLO is on by default with loose targets; 0 and 0 (or a threshold) keep the fixed placement
    assert routing_config(parse()).slo_placement
    assert (routing_config(parse()).slo_ttft_s, routing_config(parse()).slo_tpot_s) == (4.0, 0.2)
    assert not routing_config(parse("--slo-ttft-ms", "0", "--slo-itl-ms", "0")).slo_placement
    assert not routing_config(parse("--conditional-prefill-threshold", "64")).slo_placement
    for flag, policy in (("kv", Policy.KV), ("round-robin", Policy.ROUND_ROBIN), ("least-loaded", Policy.LEAST_LOADED)):
        cfg = parse("--router-policy", flag, "--conditional-prefill-threshold", "128")
        assert routing_config(cfg).policy is policy and routing_config(cfg).conditional_prefill_threshold == 128
    assert parse("--policy", "round_robin").router.policy == "round_robin"  # the earlier spelling still works
    assert routing_config(parse("--policy", "round_robin")).policy is Policy.ROUND_ROBIN
    assert parse("--router-temperature", "0.5").router.temperature == 0.5
    with pytest.raises(SystemExit):
        parse("--router-policy", "random")
    with pytest.raises(ConfigError, match="conditional_prefill_threshold must be >= 0"):
        parse("--conditional-prefill-threshold", "-1")


def test_aggregated_mode_needs_one_block_size():
    with pytest.raises(ConfigError, match="aggregated mode serves one pool"):
        parse("--mode", "aggregated", "--prefill-block-size", "16", "--decode-block-size", "32")


def test_tls_and_token_flags():
    cfg = parse("--tls-cert", "s.pem", "--tls-key", "k.pem", "--tls-client-ca", "ca.pem", "--auth-token-file", "t")
    r = cfg.router
    assert (r.tls_cert, r.tls_key, r.tls_client_ca, r.auth_token_file) == ("s.pem", "k.pem", "ca.pem", "t")
    assert parse().router.host == "127.0.0.1"  # bound to loopback unless told otherwise
    with pytest.raises(ConfigError, match="tls_cert and router.tls_key go together"):
        parse("--tls-cert", "s.pem")
    with pytest.raises(ConfigError, match="needs router.tls_cert"):
        parse("--tls-client-ca", "ca.pem")


def test_unreadable_security_files_fail_before_anything_starts(tmp_path, capsys: pytest.CaptureFixture[str]):
    assert main(["serve", "--auth-token-file", str(tmp_path / "missing")]) == 2
    assert "cannot read the auth token file" in capsys.readouterr().err
    (tmp_path / "empty").write_text("# no token here\n")
    assert main(["serve", "--auth-token-file", str(tmp_path / "empty")]) == 2
    assert "holds no token" in capsys.readouterr().err


def test_http_door_flags_and_config_keys():
    cfg = parse()
    assert (cfg.router.http, cfg.router.http_port, cfg.router.host) == (True, 8000, "127.0.0.1")
    assert parse("--http-port", "9001").router.http_port == 9001
    assert parse("--no-http").router.http is False
    with pytest.raises(ConfigError, match="router.http_port and router.port are both 9000"):
        parse("--port", "9000", "--http-port", "9000")
    with pytest.raises(ConfigError, match="router.http_port must be in 0..65535"):
        parse("--http-port", "70000")
    assert parse("--port", "9000", "--http-port", "9000", "--no-http").router.http is False  # off: no clash


def test_speculative_flags_and_config_keys(tmp_path, capsys: pytest.CaptureFixture[str]):
    assert parse().speculative.method is None
    cfg = parse(
        "--speculative",
        "ngram",
        "--num-speculative-tokens",
        "3",
        "--prompt-lookup-min",
        "1",
        "--prompt-lookup-max",
        "5",
        "--speculative-disable-batch-size",
        "0",
    )
    s = cfg.speculative
    assert (s.method, s.num_speculative_tokens, s.prompt_lookup_min, s.prompt_lookup_max, s.disable_batch_size) == (
        "ngram",
        3,
        1,
        5,
        0,
    )
    engine = s.engine()
    assert engine.enabled and engine.num_speculative_tokens == 3
    d = parse("--speculative", "draft", "--draft-model", "/models/draft").speculative
    assert (d.method, d.draft_model) == ("draft", "/models/draft")
    with pytest.raises(ConfigError, match="speculative: .*needs draft_model"):
        parse("--speculative", "draft")
    with pytest.raises(ConfigError, match="num_speculative_tokens must be in 1..16"):
        parse("--speculative", "ngram", "--num-speculative-tokens", "0")
    with pytest.raises(ConfigError, match="only used by speculative method 'draft'"):
        parse("--speculative", "ngram", "--draft-model", "/m")
    path = tmp_path / "c.yaml"
    path.write_text("speculative:\n  method: ngram\n  num_speculative_tokens: 2\n")
    assert parse("--config", str(path)).speculative.num_speculative_tokens == 2
    path.write_text("speculative:\n  method: eagle\n")
    with pytest.raises(ConfigError, match="speculative.method"):
        parse("--config", str(path))
    # generate --server takes no speculative flags: the server's are chosen when it starts
    assert main(["generate", "--server", "127.0.0.1:1", "--speculative", "ngram", "--prompt", "x"]) == 2
    assert "speculative flags apply to --offline only" in capsys.readouterr().err


def test_workers_must_agree_on_model_speculation_and_wire_version():
    from common.contract import WIRE_VERSION, ModelInfo
    from deploy.cluster import check_workers_agree

    def info(fp="m1", spec="", wire=WIRE_VERSION):
        return ModelInfo(
            name="x",
            fingerprint=fp,
            vocab_size=512,
            max_model_len=2048,
            eos_token_ids=[2],
            kv_capacity_tokens=1024,
            speculative=spec,
            wire_version=wire,
        )

    check_workers_agree([info(spec="ngram k=4"), info(spec="ngram k=4")])
    with pytest.raises(ConfigError, match=rf"a worker speaks wire version 3, this router {WIRE_VERSION}"):
        check_workers_agree([info(), info(wire=3)])
    with pytest.raises(ConfigError, match="different models"):
        check_workers_agree([info(), info(fp="m2")])
    with pytest.raises(
        ConfigError, match=r"worker decode-3 and the cluster run different speculative .*\['ngram k=4', 'off'\]"
    ):
        check_workers_agree([info(spec="ngram k=4"), info()], joining="decode-3")


def test_core_sharing_keys_from_a_config_file_and_a_bad_lending_target_is_refused(tmp_path):
    import msgspec

    from deploy.config import PoolConfig

    cfg = parse()
    # by default a disaggregated prefill worker borrows, a decode worker lends up to 200 ms per output token
    # (or the router's TPOT target), and aggregated workers do neither
    assert cfg.prefill.core_sharing("prefill") == (True, 0.0)
    assert cfg.decode.core_sharing("decode") == (False, 200.0)
    assert cfg.decode.core_sharing("decode", slo_itl_ms=120.0) == (False, 120.0)
    assert cfg.prefill.core_sharing("aggregated") == cfg.decode.core_sharing("aggregated") == (False, 0.0)
    off = PoolConfig(borrow_idle_cores=False, lend_core_tpot_ms=0.0)
    assert off.core_sharing("prefill") == off.core_sharing("decode", 120.0) == (False, 0.0)
    lending = msgspec.structs.replace(cfg, decode=msgspec.structs.replace(cfg.decode, lend_core_tpot_ms=200.0))
    assert lending.validate().decode.lend_core_tpot_ms == 200.0
    bad = msgspec.structs.replace(cfg, decode=msgspec.structs.replace(cfg.decode, lend_core_tpot_ms=-1.0))
    with pytest.raises(ConfigError, match=r"decode.lend_core_tpot_ms must be >= 0 \(a TPOT target in ms; 0: never"):
        bad.validate()
    path = tmp_path / "lend.yaml"
    path.write_text("prefill:\n  borrow_idle_cores: true\ndecode:\n  lend_core_tpot_ms: 150\n")
    from_file = parse("--config", str(path))
    assert from_file.prefill.borrow_idle_cores and from_file.decode.core_sharing("decode") == (False, 150.0)
