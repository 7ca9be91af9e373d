// A room's online list: one entry per session (member id), kept sorted as the server sorts
// (name without regard to case, then id). It starts from the snapshot in `welcome` or a
// `join` ack and then applies `presence` changes, each in time proportional to its size,
// not to the room's: a binary search and one splice per member.

const order = (a, b) => (a < b ? -1 : a > b ? 1 : 0);

const keyOf = (member) => [member.name.toLowerCase(), member.id];

function compare(a, b) {
  const [an, ai] = keyOf(a);
  const [bn, bi] = keyOf(b);
  return order(an, bn) || order(ai, bi);
}

export class OnlineList {
  constructor(members = []) {
    this.reset(members);
  }

  /** Start again from a snapshot (welcome, join ack). */
  reset(members) {
    this.byId = new Map(members.map((m) => [m.id, m]));
    this.sorted = [...this.byId.values()].sort(compare);
    this.nameCounts = new Map();
    for (const member of this.sorted) this.#count(member.name, 1);
  }

  /** SPEC's rule: drop every `leaves` id, then add every `joins` entry (replacing one with the same id). */
  apply({ joins = [], leaves = [] }, keep = null) {
    for (const member of leaves) if (member.id !== keep) this.#remove(member.id);
    for (const member of joins) {
      this.#remove(member.id);
      this.#add(member);
    }
  }

  get size() {
    return this.sorted.length;
  }

  has(id) {
    return this.byId.has(id);
  }

  /** The first `limit` members, in order. */
  first(limit) {
    return this.sorted.slice(0, limit);
  }

  /** Whether another member of the room shows the same name (then the page tells them apart). */
  nameIsShared(name) {
    return (this.nameCounts.get(name) ?? 0) > 1;
  }

  #add(member) {
    this.byId.set(member.id, member);
    this.sorted.splice(this.#indexOf(member), 0, member);
    this.#count(member.name, 1);
  }

  #remove(id) {
    const member = this.byId.get(id);
    if (!member) return;
    this.byId.delete(id);
    const index = this.#indexOf(member);
    if (this.sorted[index]?.id === id) this.sorted.splice(index, 1);
    this.#count(member.name, -1);
  }

  #count(name, delta) {
    const count = (this.nameCounts.get(name) ?? 0) + delta;
    if (count > 0) this.nameCounts.set(name, count);
    else this.nameCounts.delete(name);
  }

  #indexOf(member) {
    let low = 0;
    let high = this.sorted.length;
    while (low < high) {
      const mid = (low + high) >> 1;
      if (compare(this.sorted[mid], member) < 0) low = mid + 1;
      else high = mid;
    }
    return low;
  }
}
