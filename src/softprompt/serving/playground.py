"""The playground: a page at ``/`` (and ``/playground``) to pick a served prompt, type an
input, and watch the base model's and the tuned answer stream side by side. It is static
HTML calling the server's own API (``/v1/models``, ``/v1/completions`` or
``/v1/chat/completions`` with ``stream``), so it shows exactly what API clients get. The page
holds no data and is served without the API key; the key typed into it is sent as
``Authorization: Bearer`` on its API calls, as any client sends it."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import HTMLResponse

PATHS = ("/", "/playground")

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>softprompt playground</title>
<style>
body { font: 15px/1.45 system-ui, sans-serif; margin: 2rem auto; max-width: 60rem;
       padding: 0 1rem; }
form { display: grid; gap: .6rem; }
.row { display: flex; gap: .8rem; align-items: center; flex-wrap: wrap; }
textarea { width: 100%; min-height: 5rem; font: inherit; }
.answers { display: grid; grid-template-columns: 1fr 1fr; gap: 1rem; margin-top: 1rem; }
.answers pre { white-space: pre-wrap; background: #f6f6f6; padding: .8rem; min-height: 4rem;
               margin: 0; }
.error { color: #b00020; }
</style></head>
<body>
<h1>softprompt playground</h1>
<p>The base model and the same model with a trained soft prompt, on the same input.</p>
<form id="form">
  <div class="row">
    <label>Prompt <select id="model" name="model"></select></label>
    <label><input type="checkbox" id="chat"> chat (a user message)</label>
    <label>max tokens
      <input type="number" id="max_tokens" value="32" min="1" style="width:5rem"></label>
    <label>API key <input type="password" id="key" placeholder="if the server has one"></label>
  </div>
  <textarea id="input" name="input" placeholder="Type an input"></textarea>
  <div class="row"><button type="submit" id="run">Generate</button>
  <span id="status"></span></div>
</form>
<div class="answers">
  <div><h2>base</h2><pre id="base"></pre></div>
  <div><h2 id="tuned-title">tuned</h2><pre id="tuned"></pre></div>
</div>
<script>
const $ = (id) => document.getElementById(id);
function headers() {
  const h = {"Content-Type": "application/json"};
  const key = $("key").value || localStorage.getItem("softprompt-key") || "";
  if (key) { h["Authorization"] = "Bearer " + key; localStorage.setItem("softprompt-key", key); }
  return h;
}
async function loadModels() {
  const r = await fetch("/v1/models", {headers: headers()});
  const body = await r.json();
  if (!r.ok) { $("status").textContent = body.error ? body.error.message : r.statusText;
               $("status").className = "error"; return; }
  const names = body.data.map((m) => m.id).filter((id) => id !== "base");
  $("model").innerHTML = names.map((n) => `<option>${n.replace(/</g, "&lt;")}</option>`).join("");
  $("status").textContent = names.length ? "" : "no prompt is loaded";
}
async function stream(model, out) {
  const chat = $("chat").checked, text = $("input").value;
  const body = {model, stream: true, temperature: 0, max_tokens: Number($("max_tokens").value)};
  if (chat) body.messages = [{role: "user", content: text}]; else body.prompt = text;
  out.textContent = "";
  const r = await fetch(chat ? "/v1/chat/completions" : "/v1/completions",
                        {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!r.ok) {
    const e = await r.json(); out.textContent = e.error.message; out.className = "error"; return;
  }
  out.className = "";
  const reader = r.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    const events = buffer.split("\\n\\n"); buffer = events.pop();
    for (const event of events) {
      const data = event.replace(/^data: /, "");
      if (data === "[DONE]") return;
      const chunk = JSON.parse(data);
      if (chunk.error) { out.textContent += " [" + chunk.error.message + "]"; return; }
      const c = chunk.choices[0];
      out.textContent += chat ? (c.delta.content || "") : (c.text || "");
    }
  }
}
$("form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("run").disabled = true; $("status").textContent = "generating…"; $("status").className = "";
  $("tuned-title").textContent = $("model").value || "tuned";
  try {
    await Promise.all([stream("base", $("base")), stream($("model").value, $("tuned"))]);
    $("status").textContent = "done";
  } catch (err) { $("status").textContent = String(err); $("status").className = "error"; }
  $("run").disabled = false;
});
$("key").addEventListener("change", loadModels);
loadModels();
</script>
</body></html>
"""


def add_playground(app: FastAPI) -> None:
    """Serve the page at ``/`` and ``/playground``."""
    for path in PATHS:
        app.add_api_route(path, playground, methods=["GET"], response_class=HTMLResponse,
                          include_in_schema=False)  # fmt: skip


async def playground() -> HTMLResponse:
    return HTMLResponse(PAGE)
