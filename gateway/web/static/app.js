// OpsTwin web UI: live updates over the gateway's own SSE stream (/subscribe). Plain JavaScript,
// no library, loaded from this gateway only (the CSP allows no inline script). Pages work without
// it; it only keeps them current:
//   [data-point-value="ID"]      text follows point ID's value; [data-point-quality="ID"] its quality
//   [data-refresh="URL"]         inner HTML re-fetched from URL (a server-rendered, escaped fragment)
//                                when an event of a type in data-refresh-on arrives
//   [data-reload-on="ID"]        the page reloads when an event about proposal ID arrives,
//                                unless a text field on it has been typed into
//   [data-expires="EPOCH_S"]     a countdown to that time
"use strict";
(function () {
  const PROPOSAL_EVENTS = ["ProposalCreated", "ProposalDecided", "ApprovalGranted",
    "ApprovalRejected", "ActionSucceeded", "ActionFailed", "ActionRolledBack"];

  function formatValue(v) {
    if (v === null || v === undefined) return "—";
    if (typeof v === "boolean") return v ? "true" : "false";
    if (typeof v === "number") {
      if (!isFinite(v)) return "—";
      if (Number.isInteger(v)) return String(v);
      const text = v.toPrecision(4);
      return text.indexOf("e") >= 0 || Math.abs(v) < 1e4 ? String(Number(text)) : v.toFixed(0);
    }
    return String(v);
  }

  function onTelemetry(event) {
    const data = event.data || {};
    document.querySelectorAll("[data-point-value]").forEach(function (el) {
      if (el.getAttribute("data-point-value") === event.point_id) {
        el.textContent = formatValue(data.value);
      }
    });
    document.querySelectorAll("[data-point-quality]").forEach(function (el) {
      if (el.getAttribute("data-point-quality") === event.point_id) {
        el.textContent = data.quality;
        el.className = "badge q-" + data.quality;
        el.title = data.reason || "";
      }
    });
  }

  const pending = new Map();
  function refresh(el) {
    // Coalesce a burst of events into one fetch per element.
    if (pending.has(el)) return;
    pending.set(el, setTimeout(function () {
      pending.delete(el);
      fetch(el.getAttribute("data-refresh"), { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
        .then(function (html) { el.innerHTML = html; tick(); })
        .catch(function () { /* the next event tries again */ });
    }, 250));
  }

  function typedInto() {
    return Array.from(document.querySelectorAll("textarea, input[type=text], input[type=number]"))
      .some(function (f) { return f.value && f.value !== f.defaultValue; });
  }

  function onEvent(event) {
    if (event.type === "TelemetryChanged") onTelemetry(event);
    document.querySelectorAll("[data-refresh]").forEach(function (el) {
      const types = (el.getAttribute("data-refresh-on") || "").split(" ");
      if (types.indexOf(event.type) >= 0) refresh(el);
    });
    const reload = document.querySelector("[data-reload-on]");
    if (reload && PROPOSAL_EVENTS.indexOf(event.type) >= 0) {
      const id = reload.getAttribute("data-reload-on");
      const data = event.data || {};
      if (data.proposal === id && !typedInto()) {
        window.location.reload();
      }
    }
  }

  function connect() {
    const wanted = document.querySelector("[data-point-value], [data-refresh], [data-reload-on]");
    const live = document.getElementById("live");
    if (!wanted || !window.EventSource) return;
    const source = new EventSource("/subscribe");
    const types = ["TelemetryChanged"].concat(PROPOSAL_EVENTS);
    types.forEach(function (type) {
      source.addEventListener(type, function (message) {
        try { onEvent(JSON.parse(message.data)); } catch (e) { /* a malformed event is skipped */ }
      });
    });
    source.onopen = function () {
      if (live) { live.textContent = "live"; live.setAttribute("data-state", "on"); }
    };
    source.onerror = function () {
      if (live) { live.textContent = "reconnecting…"; live.setAttribute("data-state", "off"); }
    };
  }

  function tick() {
    const now = Date.now() / 1000;
    document.querySelectorAll("[data-expires]").forEach(function (el) {
      const left = Number(el.getAttribute("data-expires")) - now;
      if (!isFinite(left)) return;
      if (left <= 0) { el.textContent = "expired"; el.classList.add("urgent"); return; }
      const m = Math.floor(left / 60), s = Math.floor(left % 60);
      el.textContent = (m ? m + " min " : "") + s + " s";
      el.classList.toggle("urgent", left < 60);
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    connect();
    tick();
    setInterval(tick, 1000);
  });
})();
