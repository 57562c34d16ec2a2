// Live updates for the on-call view: every few seconds, fetch this page again and swap
// in its <main>, unless the reader is typing in a form there. The page works without it.
// When the fetch ends up elsewhere (a redirect, e.g. to /login after the session
// expired) it stops and asks for a reload instead of swapping in another page.
(function () {
  "use strict";
  var main = document.getElementById("live");
  if (!main || main.getAttribute("data-live") !== "true") {
    return;
  }
  var every = parseInt(main.getAttribute("data-refresh-ms"), 10) || 5000;
  var timer = null;
  // A form inside <main> with something typed in it: not swapped away until it is sent
  // or emptied again.
  var dirty = false;
  function typed() {
    var fields = main.querySelectorAll("input[type=text], input:not([type]), textarea");
    for (var k = 0; k < fields.length; k++) {
      if (fields[k].value !== "") { return true; }
    }
    return false;
  }
  main.addEventListener("input", function () { dirty = typed(); });
  main.addEventListener("submit", function () { dirty = false; });
  function busy() {
    var a = document.activeElement;
    return dirty || (a && a !== main && main.contains(a) && /^(INPUT|TEXTAREA|SELECT)$/.test(a.tagName));
  }
  function ended() {
    if (timer !== null) { window.clearInterval(timer); timer = null; }
    document.body.classList.add("stale");
    if (document.getElementById("session-ended")) { return; }
    var note = document.createElement("p");
    note.id = "session-ended";
    note.className = "session-ended";
    note.setAttribute("role", "alert");
    var link = document.createElement("a");
    link.href = window.location.href;
    link.textContent = "reload";
    note.appendChild(document.createTextNode("Live updates stopped: the session ended or the page moved — "));
    note.appendChild(link);
    note.appendChild(document.createTextNode("."));
    main.parentNode.insertBefore(note, main);
  }
  function refresh() {
    if (document.hidden || busy()) {
      return;
    }
    var here = window.location.href.split("#")[0];
    fetch(here, { credentials: "same-origin", headers: { "X-Tocsin-Live": "1" } })
      .then(function (r) {
        if (r.redirected || (r.url && r.url.split("#")[0] !== here)) {
          ended();
          return null;
        }
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.text();
      })
      .then(function (html) {
        if (html === null) { return; }
        var doc = new DOMParser().parseFromString(html, "text/html");
        var fresh = doc.getElementById("live");
        if (!fresh) { ended(); return; }
        if (!busy()) {
          main.innerHTML = fresh.innerHTML;
        }
        var stamp = document.getElementById("updated");
        var newStamp = doc.getElementById("updated");
        if (stamp && newStamp) { stamp.textContent = newStamp.textContent; }
        document.body.classList.remove("stale");
      })
      .catch(function () { document.body.classList.add("stale"); });
  }
  timer = window.setInterval(refresh, every);
})();
