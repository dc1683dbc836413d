"""What the registry serves is its own: the caller's tensors after register(), the copies modules() returns and
views shared between users never reach a served row, through eviction to host memory and to disk. Tensors that
cannot be served are refused by name. Rows whose logits overflow are reported, the others served. The store
never loads one user's files under another id."""
import ast
import json
from pathlib import Path

import pytest
import torch

from helpers import assert_rel_close, small_cfg
from peftu_kernels.generate import NonFiniteRowsError, greedy, score_labels
from peftu_kernels.t5 import T5
from peftu_kernels.tenancy import Engine, UserModule, load_user, save_user
from peftu_kernels.tenancy.store import MANIFEST, UserStore
from tenancy_users import make

R = 3


@pytest.fixture(scope="module")
def model():
    return T5.from_config(small_cfg("gated-untied", d_model=36, d_kv=12, num_heads=3), seed=5).eval()


@pytest.fixture(scope="module")
def inputs(model):
    g = torch.Generator().manual_seed(1)
    return torch.randint(3, 101, (R, 6), generator=g), torch.randint(3, 101, (R, 3), generator=g)


def logits(model, inputs, eng, rows):
    ids, dec = inputs
    with torch.no_grad():
        return model(ids[:len(rows)], dec[:len(rows)], peft=eng.batch(rows))


def alone(model, inputs, mods):
    eng = Engine(model, backend="reference")
    eng.register("solo", mods)
    return logits(model, inputs, eng, ["solo"] * R)


def tiers(tmp_path):
    """Engines on which "u" ends on the device, in host memory only, or on disk only, after `push`."""
    return {"device": dict(), "host": dict(capacity=1), "disk": dict(capacity=1, offload_dir=tmp_path)}


def push(eng, model, where):
    """Move "u" off the device (a batch of another user) when the engine has a capacity."""
    if where != "device":
        eng.register("other", make(model.cfg, "ia3", 4))
        eng.batch(["other"])
        assert eng.users["u"] == where


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_callers_edits_after_register_never_reach_a_row(model, inputs, tmp_path, where):
    mods = make(model.cfg, "lora", 2)
    want = alone(model, inputs, make(model.cfg, "lora", 2))
    eng = Engine(model, backend="reference", **tiers(tmp_path)[where])
    eng.register("u", mods)
    push(eng, model, where)
    for t in mods[0].tensors.values():  # a trainer that keeps training what it registered
        t.mul_(3.0).add_(1.0)
    mods[0].config["alpha"] = 1000
    assert_rel_close(logits(model, inputs, eng, ["u"] * R), want)


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_edits_to_what_modules_returned_never_reach_a_row(model, inputs, tmp_path, where):
    want = alone(model, inputs, make(model.cfg, "houlsby", 1))
    eng = Engine(model, backend="reference", **tiers(tmp_path)[where])
    eng.register("u", make(model.cfg, "houlsby", 1))
    push(eng, model, where)
    for m in eng.modules("u"):
        for t in m.tensors.values():
            t.zero_()
    assert_rel_close(logits(model, inputs, eng, ["u"] * R), want)


@pytest.mark.parametrize("where", ["device", "host", "disk"])
def test_users_built_as_views_of_one_tensor_stay_apart(model, inputs, tmp_path, where):
    base = make(model.cfg, "prompt", 2)[0].tensors["prompt"]
    want = alone(model, inputs, [UserModule("prompt", {"prompt": base.clone()})])
    eng = Engine(model, backend="reference", **tiers(tmp_path)[where])
    eng.register("u", UserModule("prompt", {"prompt": base}))
    eng.register("v", UserModule("prompt", {"prompt": base[:]}))  # a view of the same storage
    push(eng, model, where)
    base.fill_(7.0)  # one edit through the shared storage
    assert_rel_close(logits(model, inputs, eng, ["u"] * R), want)


def test_gradients_and_history_are_dropped(model):
    mods = make(model.cfg, "lora", 3)
    for k, t in list(mods[0].tensors.items()):
        mods[0].tensors[k] = (t.clone().requires_grad_(True) * 1.0)  # a non-leaf with autograd history
    eng = Engine(model, backend="reference")
    eng.register("u", mods)
    for m in eng.modules("u"):
        assert all(not t.requires_grad and t.grad_fn is None for t in m.tensors.values())


@pytest.mark.parametrize("bad,msg", [
    (lambda t: t.to("meta"), "meta device"),
    (lambda t: t.to(torch.int32), "floating-point"),
    (lambda t: t.to(torch.complex64), "floating-point"),
    (lambda t: t.to_sparse(), "dense"),
    (lambda t: "not a tensor", "floating-point tensor, got str"),
])
def test_tensors_that_cannot_be_served_are_refused_by_name(model, bad, msg):
    mods = make(model.cfg, "lora", 1)
    key = next(iter(mods[0].tensors))
    mods[0].tensors[key] = bad(mods[0].tensors[key])
    eng = Engine(model, backend="reference")
    eng.register("keep", make(model.cfg, "ia3", 2))
    with pytest.raises(ValueError, match=msg) as e:
        eng.register("u", mods)
    assert key in str(e.value) and "'u'" in str(e.value)
    assert list(eng.users) == ["keep"]


# --- rows that overflow -----------------------------------------------------------------------------------
def overflowing(model):
    mod = make(model.cfg, "lora", 4)[0]
    for k in mod.tensors:
        mod.tensors[k] = torch.full_like(mod.tensors[k], 1e30)  # finite, but the forward overflows
    return [mod]


def test_greedy_names_the_rows_that_overflow_and_serves_the_others(model, inputs):
    ids, _ = inputs
    eng = Engine(model, backend="reference")
    eng.register("ok", make(model.cfg, "lora", 1))
    eng.register("boom", overflowing(model))
    want = greedy(model, ids[2:3], None, 4)  # row 2 has no user: the base model
    with pytest.raises(NonFiniteRowsError, match=r"row 1 \(user 'boom'\)") as e:
        greedy(model, ids, None, 4, peft=eng.batch(["ok", "boom", None]))
    assert e.value.rows == [1] and e.value.users == ["boom"]
    solo = Engine(model, backend="reference")
    solo.register("ok", make(model.cfg, "lora", 1))
    ok = greedy(model, ids[:1], None, 4, peft=solo.batch(["ok"]))
    res = e.value.result
    assert torch.equal(res[0, :ok.shape[1]], ok[0]) and torch.equal(res[2, :want.shape[1]], want[0])
    assert (res[1] == model.cfg.pad_token_id).all()


def test_score_labels_names_the_rows_that_overflow(model, inputs):
    ids, _ = inputs
    eng = Engine(model, backend="reference")
    eng.register("boom", overflowing(model))
    labels = [[5, 1], [7, 1]]
    with pytest.raises(NonFiniteRowsError, match="user 'boom'") as e:
        score_labels(model, ids, None, labels, peft=eng.batch([None, "boom", None]))
    assert e.value.rows == [1]
    base = score_labels(model, ids, None, labels)
    torch.testing.assert_close(e.value.result[[0, 2]], base[[0, 2]])
    assert e.value.result[1].isnan().all()


# --- the store trusts nothing it reads back ------------------------------------------------------------------
def test_a_manifest_edited_to_lend_another_users_files_is_refused(model, tmp_path):
    store = UserStore(tmp_path)
    store.save("alice", make(model.cfg, "lora", 1))
    store.save("bob", make(model.cfg, "lora", 2))
    a, b = store.path("alice"), store.path("bob")
    for f in b.glob("*.safetensors"):  # bob's files copied into alice's folder, her manifest pointed at them
        (a / f.name).write_bytes(f.read_bytes())
    man = json.loads((a / MANIFEST).read_text())
    man["files"]["lora"] = next(b.glob("*.safetensors")).name
    (a / MANIFEST).write_text(json.dumps(man))
    with pytest.raises(ValueError, match="belongs to user 'bob', not 'alice'"):
        store.load("alice")
    (b / MANIFEST).write_text(json.dumps({**json.loads((b / MANIFEST).read_text()), "user": "alice"}))
    with pytest.raises(ValueError, match="not 'alice'|holds user"):
        load_user(b, "alice")


@pytest.mark.parametrize("garbage", [b"", b"{", b"[]", b'{"format": "peftu-user-1", "files": {"lora": "../x"}}',
                                     b'{"format": "peftu-user-1", "files": {"lora": "lora.safetensors"}, "user": 3}'])
def test_a_corrupted_manifest_is_refused_by_name(model, tmp_path, garbage):
    save_user(tmp_path / "u", make(model.cfg, "lora", 1), "u")
    (tmp_path / "u" / MANIFEST).write_bytes(garbage)
    with pytest.raises(ValueError, match=MANIFEST):
        load_user(tmp_path / "u", "u")


def test_a_lone_surrogate_id_is_refused_at_register(model):
    eng = Engine(model, backend="reference")
    with pytest.raises(ValueError, match="not valid Unicode"):
        eng.register("a\ud800b", make(model.cfg, "lora", 1))
    assert not eng.users


# --- the house ------------------------------------------------------------------------------------------------
def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the package modules it imports (every import statement, at any depth, TYPE_CHECKING too)."""
    mods = {}
    for p in root.rglob("*.py"):
        parts = list(p.relative_to(root.parent).with_suffix("").parts)
        mods[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    graph = {}
    for m, p in mods.items():
        pkg = m if p.name == "__init__.py" else m.rsplit(".", 1)[0]
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = pkg.split(".")[: len(pkg.split(".")) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                deps |= {f"{target}.{a.name}" if f"{target}.{a.name}" in mods else target for a in node.names}
            elif isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
        graph[m] = {d for d in deps if d in mods and d != m}
    return graph


def cycle(graph):
    state, stack = {}, []

    def visit(v):
        state[v] = 1
        stack.append(v)
        for w in sorted(graph[v]):
            if state.get(w) == 1:
                return stack[stack.index(w):] + [w]
            if w not in state and (found := visit(w)):
                return found
        state[v] = 2
        stack.pop()

    for v in sorted(graph):
        if v not in state and (found := visit(v)):
            return found
    return None


def test_the_walker_finds_a_circle():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]


def test_no_circle_of_imports_in_the_library():
    import peftu_kernels
    found = cycle(import_graph(Path(peftu_kernels.__file__).parent))
    assert found is None, " -> ".join(found)
