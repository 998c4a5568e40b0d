// The console works without this file. It only adds: local times in tooltips, a periodic
// refresh of lists that wait for decisions, and no double submission of a decision.
(function () {
  "use strict";

  function localTimes(root) {
    root.querySelectorAll("time[datetime]").forEach(function (el) {
      var when = new Date(el.getAttribute("datetime"));
      if (!isNaN(when)) { el.title = "Your time: " + when.toLocaleString(); }
    });
  }

  function refresh(main) {
    var seconds = parseInt(main.getAttribute("data-refresh"), 10);
    var target = main.getAttribute("data-refresh-target");
    if (!seconds || !target) { return; }
    window.setInterval(function () {
      var active = document.activeElement;
      if (document.hidden || (active && /^(INPUT|TEXTAREA|SELECT)$/.test(active.tagName))) { return; }
      fetch(window.location.href, { credentials: "same-origin", headers: { "Accept": "text/html" } })
        .then(function (r) { return r.ok && !r.redirected ? r.text() : null; })
        .then(function (html) {
          if (!html) { return; }
          var fresh = new DOMParser().parseFromString(html, "text/html").getElementById(target);
          var current = document.getElementById(target);
          if (fresh && current) { current.replaceWith(fresh); localTimes(fresh); }
        })
        .catch(function () { /* keep what is shown */ });
    }, seconds * 1000);
  }

  function oneSubmit() {
    document.querySelectorAll("form").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (form.dataset.sent) { event.preventDefault(); return; }
        form.dataset.sent = "1";
        // Disabling the clicked button would drop its name/value from the form: defer it.
        window.setTimeout(function () {
          form.querySelectorAll("button").forEach(function (b) { b.disabled = true; });
        }, 0);
      });
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    localTimes(document);
    var main = document.getElementById("main");
    if (main) { refresh(main); }
    oneSubmit();
  });
})();
