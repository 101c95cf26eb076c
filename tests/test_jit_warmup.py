"""A node compiles what its rounds run when it joins, not in a round."""

import json
import subprocess
import sys
import textwrap

# In a fresh process (numba's dispatchers of this test process already hold whatever other
# tests compiled): compile at join, then run rounds that use every coder a node runs
# (sparse layers, coded importance, a mask change per round), and list what the rounds
# added to any numba dispatcher of fedprune.
SCRIPT = textwrap.dedent(
    """
    import json, numba
    from fedprune import kernels, maskcode, rans
    from fedprune.costs import named_profile
    from fedprune.jit_warmup import compile_node_path
    from fedprune.settings import Settings
    from strategies.prunefl import PruneFL
    from tests.inprocess import Federation, small_cnn_start

    def compiled():
        return {
            f"{module.__name__}.{name}": sorted(map(str, getattr(module, name).signatures))
            for module in (kernels, maskcode, rans)
            for name in dir(module)
            if isinstance(getattr(module, name), numba.core.registry.CPUDispatcher)
        }

    compile_node_path()
    at_join = compiled()
    settings = Settings(model="small-cnn", cost_profile="paper-uniform", local_steps=2,
                        batch_size=10, clients_per_round=2, learning_rate=0.1,
                        importance_code="coded", layer_format="sparse")
    params, masks, names = small_cnn_start(0.3)
    strategy = PruneFL(params=params, masks=masks, clients_per_round=2, reconfig_interval=1,
                       profile=named_profile("paper-uniform", names))
    fed = Federation(settings, 2)
    for server_round in (1, 2, 3):
        fed.train_round(strategy, server_round)
    added = {k: sorted(set(v) - set(at_join.get(k, []))) for k, v in compiled().items()}
    print(json.dumps({"version": strategy.mask_version, "at_join": at_join,
                      "added": {k: v for k, v in added.items() if v}}))
    """
)


def test_rounds_compile_nothing_that_joining_did_not():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, check=True, timeout=600
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["version"] >= 1, "no mask change reached the nodes: the test proves nothing"
    joined = result["at_join"]
    for name in ("rans._encode", "rans._decode", "maskcode._merge", "kernels.spmm_serial"):
        assert joined[f"fedprune.{name}"], f"{name} was not compiled at join"
    assert result["added"] == {}, f"rounds compiled more: {result['added']}"
