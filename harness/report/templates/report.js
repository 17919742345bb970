(function () {
  var orders = {
    accuracy: function (a, b) { return a.dataset.accuracy - b.dataset.accuracy || b.dataset.size - a.dataset.size; },
    size: function (a, b) { return b.dataset.size - a.dataset.size || a.dataset.accuracy - b.dataset.accuracy; }
  };
  function sortCards(key) {
    if (!orders[key]) { return; }
    document.querySelectorAll('.slice-grid').forEach(function (grid) {
      Array.prototype.slice.call(grid.children).sort(orders[key]).forEach(function (card) { grid.appendChild(card); });
    });
    document.querySelectorAll('button[data-sort]').forEach(function (button) {
      button.setAttribute('aria-pressed', String(button.dataset.sort === key));
    });
    document.body.dataset.sort = key;
  }
  document.addEventListener('DOMContentLoaded', function () {
    document.querySelectorAll('button[data-sort]').forEach(function (button) {
      button.addEventListener('click', function () { sortCards(button.dataset.sort); });
    });
    var match = /sort=(\w+)/.exec(window.location.hash);
    sortCards(match ? match[1] : 'accuracy');
  });
  window.addEventListener('load', function () {
    var broken = 0;
    document.querySelectorAll('img.thumb').forEach(function (img) {
      if (!img.naturalWidth) { img.classList.add('broken'); broken += 1; }
    });
    document.body.dataset.brokenImages = String(broken);
  });
})();
