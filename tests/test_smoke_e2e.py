"""A first end-to-end pass per family with the official SDKs (detailed suites live beside this)."""
from __future__ import annotations

import anthropic
import boto3
import ollama
import openai

from tests.conftest import CLIENT_AKID, CLIENT_AWS_SECRET, GATEWAY_KEY, recorded


def test_every_family_answers_through_the_gateway(gateway: str, mock_upstream: str) -> None:
    chat = openai.OpenAI(base_url=f"{gateway}/v1", api_key=GATEWAY_KEY).chat.completions.create(
        model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}])
    assert chat.choices[0].message.content.startswith("This is a simulated response from gpt-4o-mini")
    msg = anthropic.Anthropic(base_url=gateway, api_key=GATEWAY_KEY).messages.create(
        model="claude-x", max_tokens=16, messages=[{"role": "user", "content": "hi"}])
    assert msg.content[0].text.startswith("This is a simulated response from claude-x")
    br = boto3.client("bedrock-runtime", endpoint_url=f"{gateway}/bedrock", region_name="us-east-1",
                      aws_access_key_id=CLIENT_AKID, aws_secret_access_key=CLIENT_AWS_SECRET)
    out = br.converse(modelId="anthropic.claude-3-sonnet-20240229-v1:0",
                      messages=[{"role": "user", "content": [{"text": "hi"}]}])
    assert out["output"]["message"]["content"][0]["text"].startswith("This is a simulated response")
    ol = ollama.Client(host=f"{gateway}/ollama", headers={"Authorization": f"Bearer {GATEWAY_KEY}"})
    assert ol.chat(model="llama3", messages=[{"role": "user", "content": "hi"}], stream=False).message.content
    paths = [r["raw_path"] for r in recorded(mock_upstream)]
    assert paths == ["/v1/chat/completions", "/v1/messages",
                     "/model/anthropic.claude-3-sonnet-20240229-v1%3A0/converse", "/api/chat"]
