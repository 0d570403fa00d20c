// Keys for the choice page, and no second submission of a form (the server refuses one anyway).
(function () {
  "use strict";
  const form = document.getElementById("choice-form");
  const keys = { ArrowLeft: "choose-left", ArrowRight: "choose-right", ArrowDown: "choose-tie" };
  document.querySelectorAll("form").forEach(function (f) {
    f.addEventListener("submit", function (event) {
      if (f.classList.contains("sent")) { event.preventDefault(); return; }
      // Disabled after this event, so the pressed button's name=value is still sent.
      setTimeout(function () { f.classList.add("sent"); }, 0);
    });
  });
  if (!form) return;
  document.addEventListener("keydown", function (event) {
    const target = event.target;
    if (target && (target.tagName === "INPUT" || target.tagName === "TEXTAREA")) return;  // typing a prompt
    if (event.altKey || event.ctrlKey || event.metaKey) return;
    const id = keys[event.key];
    if (!id) return;
    event.preventDefault();
    const button = document.getElementById(id);
    if (form.requestSubmit) form.requestSubmit(button); else button.click();
  });
})();
