"""The synthesize stage's LLM agent.

- backends.py: `Backend` (one async `agenerate`), `OpenAIBackend`, `VLLMBackend`, `make_backend`
- client.py: `run_requests` / `AgentClient`: concurrency and dedup over transport.py (retries), cache.py
  (response cache) and ledger.py (token budget, agent_log.jsonl); request.py: Request, Outcome, ClientConfig
- reply_json.py: `extract_json`, the first accepted JSON value in a reply (repairs by json-repair)
- prompts.py: templates in prompts/, the step schemas, and the prompt-side target view

Nothing is re-exported here, so importing one module (say prompts) does not pull in the
HTTP client stack.
"""
