// Live updates for the on-call view: every few seconds, fetch this page again and swap
// in its <main>, unless the reader is typing in a form there. The page works without it.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || main.getAttribute("data-live") !== "true") {
    return;
  }
  var every = parseInt(main.getAttribute("data-refresh-ms"), 10) || 5000;
  var dirty = false;
  main.addEventListener("input", function () { dirty = true; });
  function busy() {
    var a = document.activeElement;
    return dirty || (a && a !== main && main.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName));
  }
  function refresh() {
    if (document.hidden || busy()) {
      return;
    }
    fetch(window.location.href, { credentials: "same-origin", headers: { "X-Tocsin-Live": "1" } })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        if (fresh && !busy()) {
          main.innerHTML = fresh.innerHTML;
        }
        var stamp = document.getElementById("updated");
        var newStamp = doc.getElementById("updated");
        if (stamp && newStamp) { stamp.textContent = newStamp.textContent; }
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); });
  }
  window.setInterval(refresh, every);
})();
