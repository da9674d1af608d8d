// Tandem's web console: chat through the orchestrator's OpenAI endpoint (streamed), the live panel,
// personal documents and the demo's link controls, over the same origin's HTTP API.
//
// Rules this file keeps:
// - Model and user text reaches the page through textContent (never innerHTML).
// - The API key comes from the person (the key form) or from the URL's fragment (#key=...), which
//   the browser never sends; it is kept in this tab's sessionStorage and the fragment is cleared.
//   Every API call sends it as "Authorization: Bearer KEY".
// - Per token source (the `tandem` extension of each streamed chunk): "verified" (drafts the cloud
//   accepted), "target" (the target's correction or bonus token ending a speculative round),
//   "cloud" (the cloud route), "local" (generated on the device, e.g. after a fallback).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "tandem-api-key";
  const MAX_CELLS = 4096;  // token cells drawn per answer (the budget's maximum)
  const state = {
    key: null,
    messages: [],        // the conversation sent with each request
    abort: null,         // AbortController of the answer streaming now
    rounds: [],          // {accepted, ms} per round of the answer, for the chart
  };

  // --- the API key ---

  function takeKeyFromFragment() {
    const m = /(?:^#|&)key=([^&]+)/.exec(location.hash);
    if (m) {
      sessionStorage.setItem(KEY_STORE, decodeURIComponent(m[1]));
      history.replaceState(null, "", location.pathname + location.search);
    }
    state.key = sessionStorage.getItem(KEY_STORE);
  }

  function askForKey(message) {
    $("key-form").hidden = false;
    if (message) showError(message);
    $("key-input").focus();
  }

  function headers(json) {
    const h = {};
    if (json) h["Content-Type"] = "application/json";
    if (state.key) h["Authorization"] = "Bearer " + state.key;
    return h;
  }

  class ApiError extends Error {
    constructor(status, body) {
      const err = (body && body.error) || {};
      super(typeof err === "object" ? (err.message || "HTTP " + status) : String(err));
      this.status = status;
      this.param = err.param || null;
    }
  }

  async function api(method, path, body) {
    const resp = await fetch(path, {method, headers: headers(body !== undefined),
                                    body: body === undefined ? undefined : JSON.stringify(body)});
    let data = null;
    try { data = await resp.json(); } catch (_) { data = null; }
    if (resp.status === 401) {
      setConn("API key needed", "bad");
      askForKey("This orchestrator needs its API key.");
    }
    if (!resp.ok) throw new ApiError(resp.status, data);
    return data;
  }

  // --- small helpers ---

  function showError(text) { $("error").textContent = text || ""; }
  function setText(id, text) { $(id).textContent = text; }
  function fmt(x, digits, unit) {
    return (x === null || x === undefined || !isFinite(x)) ? "–" : x.toFixed(digits) + (unit || "");
  }
  function setConn(text, cls) {
    const el = $("conn");
    el.textContent = text;
    el.className = "pill " + (cls || "");
  }
  function el(tag, cls, text) {
    const node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  // --- status polling: link, RTT, edge, demo controls ---

  async function pollStatus() {
    try {
      const s = await api("GET", "/v1/tandem/status");
      setConn("connected", "ok");
      const link = s.link;
      setText("link-state", link.state + (link.circuit && link.circuit !== "closed" ? " (circuit " + link.circuit + ")" : ""));
      $("link-state").dataset.state = link.state;
      setText("rtt", link.rtt_ms === null ? "–" : fmt(link.rtt_ms, 1, " ms") +
              (link.jitter_ms ? " ± " + fmt(link.jitter_ms, 1, " ms") : ""));
      setText("edge", s.edge_healthy ? "healthy" : "not answering");
      setText("recent-acceptance", s.recent_acceptance === null ? "–" : fmt(100 * s.recent_acceptance, 0, " %"));
      $("demo").hidden = !s.link_control;
      if (s.conditions) showConditions(s.conditions);
      if (!s.personal) setText("docs-note", "Personal documents are off on this orchestrator.");
    } catch (e) {
      if (e.status !== 401) setConn("orchestrator not answering", "bad");
    }
  }

  function showConditions(c) {
    const el = $("conditions");
    el.textContent = "mode " + c.mode + ", RTT +" + c.rtt_ms + " ms" +
      (c.jitter_ms ? ", jitter " + c.jitter_ms + " ms" : "") +
      (c.bandwidth_kbps ? ", " + c.bandwidth_kbps + " kbps" : "");
    el.dataset.mode = c.mode;
    el.dataset.rtt = String(c.rtt_ms);
  }

  async function linkAction(action) {
    const body = {action};
    if (action === "slow") body.rtt_ms = Number($("slow-rtt").value || 300);
    try {
      const r = await api("POST", "/v1/tandem/link", body);
      showConditions(r.conditions);
      showError("");
    } catch (e) { showError("link: " + e.message); }
  }

  // --- chat ---

  function scrollDown() {  // the transcript only, never the page
    const t = $("transcript");
    t.scrollTop = t.scrollHeight;
  }

  function addMessage(role, text) {
    const box = el("div", "msg " + role);
    if (text !== undefined) box.textContent = text;
    $("transcript").appendChild(box);
    scrollDown();
    return box;
  }

  function resetLive() {
    state.rounds = [];
    for (const id of ["route-now", "reason", "tps", "ttft", "acceptance", "token-count"]) setText(id, "–");
    $("route-now").className = "";
    drawChart();
  }

  function showRoute(route, note) {
    const r = $("route-now");
    r.textContent = route + (note ? " " + note : "");
    r.className = "route-" + route;
    r.dataset.route = route;
  }

  function requestBody(prompt) {
    const body = {
      model: "tandem", stream: true, messages: state.messages.concat([{role: "user", content: prompt}]),
      max_tokens: Number($("max-tokens").value) || 256, temperature: Number($("temperature").value) || 0,
      tandem: {route: $("route").value, privacy: $("privacy").value, use_personal_context: $("personal").checked},
    };
    return body;
  }

  // Server-sent events from a fetch body: yields each `data:` payload.
  async function* sse(resp) {
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const {value, done} = await reader.read();
      if (done) break;
      buf += decoder.decode(value, {stream: true});
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (line.startsWith("data: ")) yield line.slice(6);
        }
      }
    }
  }

  async function send(prompt) {
    showError("");
    resetLive();
    addMessage("user", prompt);
    const answer = addMessage("assistant");
    answer.dataset.state = "streaming";
    const text = el("span", "text");
    answer.appendChild(text);
    const strip = el("div", "strip");  // one cell per committed token, coloured by its source
    strip.title = "one cell per token, coloured by where it came from";
    answer.appendChild(strip);
    const body = requestBody(prompt);
    state.abort = new AbortController();
    $("send").disabled = true;
    $("stop").disabled = false;
    const t0 = performance.now();
    const run = {t0, first: null, last: t0, tokens: 0, source: "verified", route: null, answer: "",
                 fellBack: false, strip};
    try {
      const resp = await fetch("/v1/chat/completions", {method: "POST", headers: headers(true),
                                                       body: JSON.stringify(body), signal: state.abort.signal});
      if (!resp.ok) {
        let data = null;
        try { data = await resp.json(); } catch (_) { data = null; }
        if (resp.status === 401) askForKey("This orchestrator needs its API key.");
        throw new ApiError(resp.status, data);
      }
      let finished = false;
      for await (const data of sse(resp)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(0, chunk);
        finished = onChunk(chunk, run, text, answer) || finished;
      }
      answer.dataset.state = finished ? "done" : "cut";
      state.messages = body.messages.concat([{role: "assistant", content: run.answer}]);
    } catch (e) {
      answer.dataset.state = "error";
      if (e.name === "AbortError") {
        answer.appendChild(el("span", "meta", "stopped"));
      } else {
        answer.appendChild(el("span", "meta", "error: " + e.message));
        showError(e.message);
      }
    } finally {
      state.abort = null;
      $("send").disabled = false;
      $("stop").disabled = true;
    }
  }

  // One streamed chunk; returns true for the last one (finish_reason set).
  function onChunk(chunk, run, text, answer) {
    const ext = chunk.tandem || {};
    const choice = (chunk.choices || [])[0];
    if (!choice) return false;
    if (choice.delta && choice.delta.role && ext.route) {
      run.route = ext.route;
      showRoute(ext.route);
      setText("reason", ext.reason || "–");
    }
    const content = choice.delta && choice.delta.content;
    // A chunk may commit tokens whose text is still held back (an unfinished character): empty content.
    if (content || ext.tokens) onText(content || "", ext, run, text);
    if (choice.finish_reason) {
      onStats(ext, run, answer, choice.finish_reason);
      return true;
    }
    return false;
  }

  function onText(content, ext, run, text) {
    const now = performance.now();
    if (ext.source) run.source = ext.source;
    if (content) {
      const span = el("span", "tok src-" + run.source, content);
      span.dataset.source = run.source;
      text.appendChild(span);
      run.answer += content;
    }
    const n = ext.tokens || 0;
    for (let i = 0; i < n && run.strip.childElementCount < MAX_CELLS; i++) {
      const cell = el("i", "cell src-" + run.source);
      cell.dataset.source = run.source;
      run.strip.appendChild(cell);
    }
    if (run.first === null) {
      run.first = now;
      setText("ttft", fmt(now - run.t0, 0, " ms"));
    }
    run.tokens += n;
    // A speculative round streams its accepted drafts ("verified"), then the target's token that
    // ends it ("target"): the round is complete at the latter.
    if (run.source === "verified") run.pendingAccepted = (run.pendingAccepted || 0) + n;
    else if (run.source === "target" && n > 0) {
      state.rounds.push({accepted: run.pendingAccepted || 0, ms: now - run.last});
      run.pendingAccepted = 0;
      run.last = now;
    } else if (run.source === "cloud" && n > 0) {
      state.rounds.push({accepted: 0, ms: now - run.last});
      run.last = now;
    } else run.last = now;
    if (run.source === "local" && run.route && run.route !== "local" && !run.fellBack) {
      run.fellBack = true;
      showRoute("local", "(fell back from " + run.route + ")");
      setText("reason", "the link failed mid-answer; the device goes on from the last verified token");
    }
    const secs = (now - run.first) / 1000;
    setText("token-count", String(run.tokens));
    if (secs > 0.2) setText("tps", fmt(run.tokens / secs, 1));
    if (state.rounds.length) {
      const mean = state.rounds.reduce((a, r) => a + r.accepted, 0) / state.rounds.length;
      setText("acceptance", "… " + fmt(mean, 2) + " accepted drafts/round");
    }
    drawChart();
    scrollDown();
  }

  function onStats(t, run, answer, finish) {
    if (t.ttft_ms !== null && t.ttft_ms !== undefined) setText("ttft", fmt(t.ttft_ms, 0, " ms"));
    if (t.tokens_per_s !== null && t.tokens_per_s !== undefined) setText("tps", fmt(t.tokens_per_s, 1));
    const verified = t.verified_tokens || 0, local = t.local_tokens || 0;
    setText("token-count", (verified + local) + " (" + verified + " verified, " + local + " on the device)");
    setText("acceptance", t.acceptance_rate === null || t.acceptance_rate === undefined
      ? "–" : fmt(100 * t.acceptance_rate, 1, " %"));
    const switches = t.switches || [];
    if (switches.length) {
      const last = switches[switches.length - 1];
      showRoute(last.to_route, "(from " + last.from_route + " after " + last.at_token + " tokens)");
      setText("reason", last.reason);
    } else if (t.route) {
      showRoute(t.route);
      setText("reason", t.reason || "–");
    }
    const meta = "route " + (t.route || "?") + (switches.length ? " → " + switches.map((s) => s.to_route).join(" → ") : "") +
      " · finish " + finish + (t.citations && t.citations.length ? " · " + t.citations.length + " personal chunk(s) used" : "") +
      (t.private_chunks_dropped ? " · " + t.private_chunks_dropped + " private chunk(s) withheld" : "");
    answer.appendChild(el("span", "meta", meta));
  }

  // --- the chart: accepted drafts per round (bars) and round time (line) ---

  function drawChart() {
    const canvas = $("chart");
    const ratio = window.devicePixelRatio || 1;
    const w = canvas.clientWidth || 320, h = canvas.clientHeight || 120;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const g = canvas.getContext("2d");
    g.setTransform(ratio, 0, 0, ratio, 0, 0);
    g.clearRect(0, 0, w, h);
    const rounds = state.rounds;
    g.fillStyle = "#5b6470";
    g.font = "11px system-ui, sans-serif";
    if (!rounds.length) {
      g.fillText("rounds appear here while an answer streams", 8, h / 2);
      return;
    }
    const pad = 16, n = rounds.length, bw = Math.max(1, (w - 2 * pad) / n);
    const maxAcc = Math.max(1, ...rounds.map((r) => r.accepted));
    const maxMs = Math.max(1, ...rounds.map((r) => r.ms));
    g.fillStyle = "#7fbf8f";
    rounds.forEach((r, i) => {
      const bh = (h - 2 * pad) * r.accepted / maxAcc;
      g.fillRect(pad + i * bw + 1, h - pad - bh, Math.max(1, bw - 2), bh);
    });
    g.strokeStyle = "#1d4f91";
    g.lineWidth = 1.5;
    g.beginPath();
    const points = rounds.map((r, i) => [pad + (i + 0.5) * bw, h - pad - (h - 2 * pad) * r.ms / maxMs]);
    points.forEach(([x, y], i) => { if (i === 0) g.moveTo(x, y); else g.lineTo(x, y); });
    g.stroke();
    g.fillStyle = "#1d4f91";
    if (n <= 64) points.forEach(([x, y]) => g.fillRect(x - 1.5, y - 1.5, 3, 3));
    g.fillStyle = "#5b6470";
    g.fillText("max " + maxAcc + " accepted", 4, 11);
    g.fillText(Math.round(maxMs) + " ms", w - 60, 11);
  }

  // --- personal documents ---

  async function loadDocuments() {
    const list = $("doc-list");
    let docs = [], token = "";
    try {
      do {
        const page = await api("GET", "/v1/tandem/documents" + (token ? "?page_token=" + encodeURIComponent(token) : ""));
        docs = docs.concat(page.documents);
        token = page.next_page_token;
      } while (token);
    } catch (e) {
      if (e.status !== 401) setText("docs-note", "Documents: " + e.message);
      return;
    }
    list.replaceChildren(...docs.map(documentRow));
    if (!docs.length) list.appendChild(el("li", "note", "No documents yet."));
  }

  function documentRow(doc) {
    const li = el("li");
    li.dataset.id = doc.id;
    const title = el("span", "title", doc.title || doc.id);
    title.title = doc.title + " · " + doc.kind + " · " + doc.chunks + " chunk(s), " + doc.bytes + " bytes";
    const label = el("select", "privacy");
    for (const p of ["private", "shareable"]) {
      const o = el("option", null, p);
      o.value = p;
      label.appendChild(o);
    }
    label.value = doc.privacy;
    label.addEventListener("change", async () => {
      try {
        await api("PATCH", "/v1/tandem/documents/" + encodeURIComponent(doc.id), {privacy: label.value});
        showError("");
      } catch (e) { showError("relabel: " + e.message); }
      loadDocuments();
    });
    const remove = el("button", "remove", "Remove");
    remove.type = "button";
    remove.addEventListener("click", async () => {
      try {
        await api("DELETE", "/v1/tandem/documents/" + encodeURIComponent(doc.id));
        showError("");
      } catch (e) { showError("remove: " + e.message); }
      loadDocuments();
    });
    li.append(title, label, remove);
    return li;
  }

  async function addDocument(ev) {
    ev.preventDefault();
    const file = $("doc-file").files[0];
    let text = $("doc-text").value, title = $("doc-title").value.trim(), source = "";
    if (file) {
      text = await file.text();
      title = title || file.name;
      source = file.name;
    }
    if (!text.trim()) { showError("a document needs text or a file"); return; }
    try {
      await api("POST", "/v1/tandem/documents",
                {title: title || Array.from(text.trim()).slice(0, 60).join(""), text, privacy: $("doc-privacy").value, source});
      $("doc-form").reset();
      showError("");
    } catch (e) { showError("add: " + e.message + (e.param ? " (" + e.param + ")" : "")); }
    loadDocuments();
  }

  // --- wiring ---

  function start() {
    takeKeyFromFragment();
    $("key-button").addEventListener("click", () => { $("key-form").hidden = !$("key-form").hidden; });
    $("key-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      state.key = $("key-input").value.trim() || null;
      if (state.key) sessionStorage.setItem(KEY_STORE, state.key);
      $("key-input").value = "";
      $("key-form").hidden = true;
      showError("");
      refresh();
    });
    $("key-forget").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      state.key = null;
    });
    $("chat-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const prompt = $("prompt").value.trim();
      if (!prompt || state.abort) return;
      $("prompt").value = "";
      send(prompt);
    });
    $("prompt").addEventListener("keydown", (ev) => {
      if (ev.key === "Enter" && (ev.ctrlKey || ev.metaKey)) $("chat-form").requestSubmit();
    });
    $("stop").addEventListener("click", () => { if (state.abort) state.abort.abort(); });
    $("new-chat").addEventListener("click", () => {
      state.messages = [];
      $("transcript").replaceChildren();
      resetLive();
    });
    $("link-cut").addEventListener("click", () => linkAction("cut"));
    $("link-blackhole").addEventListener("click", () => linkAction("blackhole"));
    $("link-slow").addEventListener("click", () => linkAction("slow"));
    $("link-restore").addEventListener("click", () => linkAction("restore"));
    $("doc-form").addEventListener("submit", addDocument);
    window.addEventListener("hashchange", () => { takeKeyFromFragment(); refresh(); });  // a link into an open tab
    drawChart();
    refresh();
    setInterval(pollStatus, 1000);
  }

  function refresh() {
    pollStatus();
    loadDocuments();
  }

  document.addEventListener("DOMContentLoaded", start);
})();
