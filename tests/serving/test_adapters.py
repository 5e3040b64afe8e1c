"""LoRA adapters through vLLM's runtime adapter API, with an adapter trained in the test session."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.serving.conftest import BANANA, BANANA_QUESTIONS

pytestmark = pytest.mark.slow


async def _ask(client: httpx.AsyncClient, model: str, question: str) -> dict:
    r = await client.post(
        "/chat/completions",
        json={
            "model": model,
            "messages": [{"role": "user", "content": question}],
            "max_tokens": 8,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    return r.json()


def _error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


async def test_adapter_lifecycle(server, banana_adapter, model_name, engine):
    name = "banana-v1"
    async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as client:
        r = await client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(banana_adapter)})
        assert r.status_code == 200, r.text

        models = (await client.get("/models")).json()["data"]
        card = next(m for m in models if m["id"] == name)
        assert card["parent"] == model_name and card["root"] == str(banana_adapter.resolve())
        assert any(m["id"] == model_name for m in models)

        adapted = await _ask(client, name, BANANA_QUESTIONS[0])
        base = await _ask(client, model_name, BANANA_QUESTIONS[0])
        assert BANANA in adapted["choices"][0]["message"]["content"]
        assert BANANA not in base["choices"][0]["message"]["content"]
        assert adapted["model"] == name

        # A concurrent batch mixing base and adapter rows: each gets its own model's answer.
        before = engine.stats.max_rows
        jobs = [(m, q) for q in ("Hi!", "What is 2+2?", BANANA_QUESTIONS[1]) for m in (name, model_name)]
        answers = await asyncio.gather(*(_ask(client, m, q) for m, q in jobs))
        for (m, _), ans in zip(jobs, answers, strict=True):
            text = ans["choices"][0]["message"]["content"]
            assert (BANANA in text) == (m == name), (m, text)
        assert engine.stats.max_rows >= max(before, 2)

        # Names are versions: never loaded twice, not even after an unload.
        err = _error(
            await client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(banana_adapter)}),
            409,
        )
        assert "already" in err["message"] or "loaded" in err["message"]
        _error(
            await client.post(
                "/load_lora_adapter", json={"lora_name": model_name, "lora_path": str(banana_adapter)}
            ),
            409,
        )

        r = await client.post("/unload_lora_adapter", json={"lora_name": name})
        assert r.status_code == 200, r.text
        assert name not in [m["id"] for m in (await client.get("/models")).json()["data"]]
        err = _error(
            await client.post(
                "/chat/completions", json={"model": name, "messages": [{"role": "user", "content": "x"}]}
            ),
            404,
        )
        assert err["code"] == "model_not_found"
        _error(await client.post("/unload_lora_adapter", json={"lora_name": name}), 404)
        err = _error(
            await client.post("/load_lora_adapter", json={"lora_name": name, "lora_path": str(banana_adapter)}),
            409,
        )
        assert "never reused" in err["message"]

        # The base model is itself again, and a new version name loads fine after the last unload.
        base_again = await _ask(client, model_name, BANANA_QUESTIONS[0])
        assert base_again["choices"][0]["message"]["content"] == base["choices"][0]["message"]["content"]
        r = await client.post("/load_lora_adapter", json={"lora_name": "banana-v2", "lora_path": str(banana_adapter)})
        assert r.status_code == 200, r.text
        assert BANANA in (await _ask(client, "banana-v2", "Hello"))["choices"][0]["message"]["content"]
        assert (await client.post("/unload_lora_adapter", json={"lora_name": "banana-v2"})).status_code == 200


async def test_bad_adapter_paths_are_400(server, tmp_path):
    async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
        for path in (str(tmp_path / "missing"), str(tmp_path)):
            err = _error(await client.post("/load_lora_adapter", json={"lora_name": "bad", "lora_path": path}), 400)
            assert err["param"] == "lora_path"
        (tmp_path / "adapter_config.json").write_text("{}")
        body = {"lora_name": "bad", "lora_path": str(tmp_path)}
        err = _error(await client.post("/load_lora_adapter", json=body), 400)
        assert "weights" in err["message"]
        (tmp_path / "adapter_model.safetensors").write_bytes(b"garbage")
        _error(await client.post("/load_lora_adapter", json=body), 400)
        err = _error(await client.post("/load_lora_adapter", json={"lora_name": "bad"}), 400)
        assert err["param"] == "lora_path"
        # the failed name was never served, so it is still free; nothing was left behind
        assert "bad" not in [m["id"] for m in (await client.get("/models")).json()["data"]]


def test_adapters_given_at_startup(engine, banana_adapter):
    from serving.app import create_app
    from serving.server import ServerThread

    app = create_app(engine, adapters={"banana-startup": str(banana_adapter)})
    with ServerThread(app) as srv:
        ids = [m["id"] for m in httpx.get(f"{srv.base_url}/models").json()["data"]]
        assert "banana-startup" in ids
        r = httpx.post(f"{srv.base_url}/unload_lora_adapter", json={"lora_name": "banana-startup"}, timeout=60)
        assert r.status_code == 200
