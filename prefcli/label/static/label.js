// The rater's page: keys and buttons answer the item on screen through /api/answer. An answer waits in
// localStorage until the server acknowledges it, and is retried (same client_id: the server records it once)
// after a network failure or a reload. While one is on its way, keys are dropped: type-ahead never answers
// an item that is not on screen. Without this script the page still works through its plain forms.
(function () {
  "use strict";
  var PENDING = "prefcli-label-pending";
  var csrf = document.body.getAttribute("data-csrf");
  var item = document.getElementById("item");
  var statusEl = document.getElementById("status");
  var busy = false;

  function say(text, cls) { statusEl.textContent = text; statusEl.className = cls || ""; }
  function randomId() {
    var a = new Uint8Array(16);
    window.crypto.getRandomValues(a);
    return Array.prototype.map.call(a, function (b) { return ("0" + b.toString(16)).slice(-2); }).join("");
  }
  function setBusy(on) {
    busy = on;
    var buttons = document.querySelectorAll("button");
    for (var i = 0; i < buttons.length; i++) { buttons[i].disabled = on; }
  }

  function send(p, attempt) {
    setBusy(true);
    fetch(p.url, {
      method: "POST", credentials: "same-origin",
      headers: {"Content-Type": "application/json", "X-CSRF-Token": csrf, "Accept": "application/json"},
      body: JSON.stringify(p.body)
    }).then(function (r) {
      if (r.status >= 500) { throw new Error("server error " + r.status); }
      return r.json().catch(function () { return {}; }).then(function (j) {
        localStorage.removeItem(PENDING);
        if (!r.ok) {
          say((j.error || ("refused (" + r.status + ")")) + " — loading the next item …", "error");
          setTimeout(function () { location.replace("/label"); }, 1500);
          return;
        }
        location.replace("/label");
      });
    }).catch(function () {
      var wait = Math.min(1000 * Math.pow(2, attempt), 10000);
      say("Not saved yet: the server cannot be reached. Retrying in " + Math.round(wait / 1000) +
          " s … (your answer is kept; do not close this page)", "error");
      setTimeout(function () { send(p, attempt + 1); }, wait);
    });
  }

  function post(url, body) {
    if (busy) { return; }
    body.client_id = randomId();
    var p = {url: url, body: body};
    localStorage.setItem(PENDING, JSON.stringify(p));
    say("Saving …");
    send(p, 0);
  }

  function answer(value) {
    if (!item) { return; }
    post("/api/answer", {assignment: parseInt(item.getAttribute("data-assignment"), 10), answer: value});
  }
  function undo() { post("/api/undo", {}); }

  // ranking: the order typed so far, shown as badges on the candidates
  var order = [];
  function showOrder() {
    var cands = document.querySelectorAll(".cand");
    for (var i = 0; i < cands.length; i++) {
      var pos = parseInt(cands[i].getAttribute("data-pos"), 10);
      var badge = cands[i].querySelector(".rank-badge");
      var at = order.indexOf(pos);
      badge.hidden = at < 0;
      badge.textContent = at < 0 ? "" : " — #" + (at + 1);
    }
    var input = document.getElementById("rank-order");
    if (input) { input.value = order.join(" "); }
  }

  document.addEventListener("keydown", function (e) {
    if (e.ctrlKey || e.metaKey || e.altKey || e.target.tagName === "INPUT") { return; }
    if (busy) { e.preventDefault(); return; }  // an answer is on its way: this key was meant for the next item
    var k = e.key.toLowerCase();
    if (k === "?") { var d = document.getElementById("instructions"); d.open = !d.open; return; }
    if (k === "u") { e.preventDefault(); undo(); return; }
    if (!item) { return; }
    var mode = item.getAttribute("data-mode");
    var n = parseInt(item.getAttribute("data-n"), 10);
    if (k === "s") { e.preventDefault(); answer("skip"); return; }
    if (mode === "pair") {
      var map = {a: "A", "1": "A", b: "B", "2": "B", t: "tie"};
      if (map[k]) { e.preventDefault(); answer(map[k]); }
    } else if (mode === "rate") {
      var s = parseInt(k, 10);
      if (s >= 1 && s <= parseInt(item.getAttribute("data-scale"), 10)) { e.preventDefault(); answer(s); }
    } else {
      var p = parseInt(k, 10);
      if (k === "backspace") { order.pop(); showOrder(); e.preventDefault(); return; }
      if (p >= 1 && p <= n && order.indexOf(p) < 0) {
        order.push(p);
        if (order.length === n - 1) {  // the last place follows
          for (var q = 1; q <= n; q++) { if (order.indexOf(q) < 0) { order.push(q); } }
        }
        showOrder();
        if (order.length === n) { answer(order.slice()); }
      }
    }
  });

  var form = document.getElementById("answer-form");
  if (form) {
    form.addEventListener("submit", function (e) {
      e.preventDefault();
      var b = e.submitter;
      if (b && b.name === "answer") { answer(b.value); return; }
      var typed = document.getElementById("rank-order");
      if (typed) { answer(typed.value); }
    });
  }
  var undoForm = document.getElementById("undo-form");
  undoForm.addEventListener("submit", function (e) { e.preventDefault(); undo(); });

  var pending = localStorage.getItem(PENDING);  // an answer sent before a reload or a lost connection
  if (pending) {
    say("Sending your last answer again …");
    send(JSON.parse(pending), 0);
  }
})();
