"""The adapter reference grammar (adapters/ref.py) and registry.resolve, the one place that decides
what a caller may use."""

import pytest

from ddft.adapters import registry
from ddft.adapters.ref import SHAPE, AdapterRef, tenant_of, tenant_owner, visible_owners
from ddft.errors import BadArgument, Conflict, Invalid, NotFound
from ddft.models.info import BaseInfo
from ddft.store import Store
from serve.errors import status_of


@pytest.mark.parametrize(
    "text, ref",
    [
        ("video", AdapterRef("video")),
        (" video/v2 ", AdapterRef("video", version=2)),
        ("ddft/video", AdapterRef("video", owner="ddft")),  # once read as name "ddft", version "ideo"
        ("tenant-acme/mine/v12", AdapterRef("mine", owner="tenant-acme", version=12)),
        ("tiny:ddft/text/v1", AdapterRef("text", owner="ddft", version=1)),
    ],
)
def test_every_shape_of_the_grammar_parses_and_prints_back(text, ref):
    assert AdapterRef.parse(text, base_id="tiny") == ref
    assert AdapterRef.parse(str(ref)) == ref


@pytest.mark.parametrize(
    "text, kind, code",
    [
        ("", BadArgument, "bad_adapter"),
        (5, BadArgument, "bad_adapter"),
        ("a/b/c", BadArgument, "bad_adapter"),  # three parts: the last must be v<N>
        ("a/b/c/v1", BadArgument, "bad_adapter"),
        ("Video", NotFound, "unknown_adapter"),  # can't exist: no store path has it
        ("../x/v1", NotFound, "unknown_adapter"),
        ("other-base:ddft/video", NotFound, "unknown_adapter"),  # not this base's: names nothing here
        ("x/y:a/b", NotFound, "unknown_adapter"),
    ],
)
def test_malformed_references_say_which_kind(text, kind, code):
    with pytest.raises(kind) as err:
        AdapterRef.parse(text, base_id="tiny")
    assert err.value.code == code and status_of(err.value) in (400, 404)
    # the documented shape (the OpenAPI pattern of `adapter`) says which: 400s are exactly the misshapen
    assert bool(SHAPE.match(text) if isinstance(text, str) else False) == (code != "bad_adapter")


def test_owner_naming_has_one_home():
    assert tenant_owner("acme") == "tenant-acme" and tenant_of("tenant-acme") == "acme" and tenant_of("ddft") is None
    assert visible_owners("acme") == ["tenant-acme", "ddft"] and visible_owners(None) == ["ddft"]


def test_resolve_decides_visibility_base_and_modality(tmp_path):
    store = Store(str(tmp_path / "store"))
    import json

    import torch
    from safetensors.torch import save_file

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2}))
    save_file({"w": torch.zeros(2, 2)}, str(folder / "adapter_model.safetensors"))
    base = BaseInfo("tiny", "f" * 64, "")
    kw = dict(base=base, source="uploaded")
    ours = registry.publish(store, folder, owner="ddft", name="video", modality="video", **kw)
    theirs = registry.publish(store, folder, owner=tenant_owner("other"), name="secret", modality="text", **kw)
    registry.publish(store, folder, owner=tenant_owner("acme"), name="video", modality="video", **kw)

    assert registry.resolve(store, "video", None, "ddft/video", base) == ours
    assert registry.resolve(store, "video", "acme").owner == "tenant-acme"  # the caller's first
    assert registry.resolve(store, "text", "acme") is None  # nothing for text: the base answers
    with pytest.raises(NotFound):  # another tenant's adapter does not exist for you
        registry.resolve(store, "text", "acme", str(AdapterRef(theirs.name, theirs.owner, theirs.version)))
    with pytest.raises(Invalid) as err:
        registry.resolve(store, "text", None, "ddft/video/v1")
    assert (status_of(err.value), err.value.code) == (422, "adapter_modality")
    with pytest.raises(Conflict) as err:
        registry.resolve(store, "video", None, "video", BaseInfo("other", "0" * 64, ""))
    assert (status_of(err.value), err.value.code) == (409, "adapter_other_base")


@pytest.mark.parametrize("cut", [4, 40, -3])
def test_publish_refuses_broken_weights_and_leaves_nothing(tmp_path, cut):
    """The one check every published adapter passes reads the safetensors header from bytes (no
    torch): a file cut short anywhere is refused, and no version, claim or staging file stays."""
    import json

    import torch
    from safetensors.torch import save_file

    store = Store(str(tmp_path / "store"))
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    save_file({"w": torch.ones(4, 4), "v": torch.zeros(2)}, str(folder / "adapter_model.safetensors"))
    files = registry.read_dir(folder)
    assert registry.validate_files(files)["r"] == 2
    weights = files["adapter_model.safetensors"]
    files["adapter_model.safetensors"] = weights[:cut]
    with pytest.raises(Invalid) as err:
        registry.publish(store, files, owner="ddft", name="x", modality="text", base=BaseInfo("b", "f", ""), source="t")
    assert err.value.code == "invalid_adapter" and "safetensors" in err.value.detail
    assert store.list("adapters") == []
