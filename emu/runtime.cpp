// The emulated CUDA device (issue 22; the model and its limits: emu/cuda_emu.h; the C ABI:
// emu/runtime.h). Three parts: device buffers between inaccessible pages; the scheduler, which
// runs each CUDA thread of a block as a fiber and completes barriers and shuffles; the launch,
// which checks a kernel's arguments, catches its faults and turns every failure into a message.
//
// Build with -ffp-contract=off, as the kernels. Line tables (-g, kept in the linked binary) let a
// fault name its own file:line, read by addr2line (binutils); without them it names the kernel's.
// -DCUDA_EMU_UCONTEXT swaps the x86-64 context switch for glibc's ucontext (what other
// architectures use; about ten times slower).

#include "runtime.h"

#include <dlfcn.h>
#include <errno.h>
#include <link.h>
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <deque>
#include <map>
#include <mutex>
#include <numeric>
#include <string>
#include <vector>

#include "cuda_emu.h"

using cuda_emu::Kernel;
using cuda_emu::Site;

// The generated index (emu/signatures.rs render_index): every kernel file's table.
extern "C" const Kernel* const cuda_emu_kernel_tables[];
// The bounds of the __shared__ arrays' section (cuda_emu.h); weak, for a build without any.
extern "C" char __start_cuda_emu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_emu_shared[] __attribute__((weak));

namespace cuda_emu {
ThreadView* current_thread = nullptr;
LaunchView launch_view = {};
}  // namespace cuda_emu

namespace {

// ---- Messages ----

std::string format(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
std::string format(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(nullptr, 0, fmt, ap);
    va_end(ap);
    std::string out(n > 0 ? n : 0, '\0');
    va_start(ap, fmt);
    vsnprintf(&out[0], out.size() + 1, fmt, ap);
    va_end(ap);
    return out;
}

thread_local std::string last_error;

// The C ABI's failure: the message, kept until this OS thread's next call.
const char* error(std::string message) {
    last_error = std::move(message);
    return last_error.c_str();
}

// ---- Device buffers ----

size_t page_size() {
    static const size_t size = (size_t)sysconf(_SC_PAGESIZE);
    return size;
}

// One buffer's mapping: an inaccessible page, the data ending exactly where the inaccessible last
// page starts, that page.
struct Buffer {
    char* map;
    size_t map_size;
    char* data;
    size_t size;
};

std::mutex buffers_mutex;
std::map<uintptr_t, Buffer> buffers;  // by map address

// The buffer whose mapping, guard pages included, holds addr, or null. Needs buffers_mutex.
const Buffer* buffer_at(uintptr_t addr) {
    auto it = buffers.upper_bound(addr);
    if (it == buffers.begin()) return nullptr;
    const Buffer& b = (--it)->second;
    return addr < (uintptr_t)b.map + b.map_size ? &b : nullptr;
}

// Whether p points into a buffer's data or just past its end (a kernel argument may).
bool in_buffer(const void* p) {
    std::lock_guard<std::mutex> lock(buffers_mutex);
    const Buffer* b = buffer_at((uintptr_t)p);
    return b != nullptr && p >= b->data && p <= b->data + b->size;
}

// Empty if [p, p + bytes) lies inside one buffer's data, else why not.
std::string check_range(const char* what, const void* p, size_t bytes) {
    if (bytes == 0) return {};
    std::lock_guard<std::mutex> lock(buffers_mutex);
    const Buffer* b = buffer_at((uintptr_t)p);
    if (b == nullptr || p < b->data) return format("%s: %zu bytes at %p: not in a device buffer", what, bytes, p);
    size_t offset = (size_t)((const char*)p - b->data);
    if (offset > b->size || bytes > b->size - offset)
        return format("%s: %zu bytes at offset %zu of a %zu-byte device buffer run past its end", what, bytes, offset,
                      b->size);
    return {};
}

// ---- Fibers ----

// A fiber's stack, above an inaccessible page that turns an overflow into a fault.
constexpr size_t kStackBytes = 128 * 1024;
struct Stack {
    char* guard;
    char* top() const { return guard + page_size() + kStackBytes; }
};

#if defined(__x86_64__) && !defined(CUDA_EMU_UCONTEXT)
// A fiber's saved stack pointer; its callee-saved registers are on its stack. (swapcontext also
// saves the signal mask, a system call at each switch: several times the work of a kernel
// between two shuffles.) MXCSR and the x87 control word are not switched: no kernel changes them.
struct Context {
    void* sp;
};

extern "C" void cuda_emu_switch_stack(void** save_sp, void* load_sp);
asm(R"(
    .text
    .p2align 4
    .globl cuda_emu_switch_stack
    .hidden cuda_emu_switch_stack
    .type cuda_emu_switch_stack, @function
cuda_emu_switch_stack:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size cuda_emu_switch_stack, .-cuda_emu_switch_stack
)");

// Sets c up to start entry on the stack: six zero registers for the pops, then entry as the
// return address, 16-aligned so that entry sees the stack alignment of a call.
void context_start(Context& c, const Stack& stack, void (*entry)()) {
    void** top = (void**)stack.top();
    top[-1] = nullptr;  // entry's own return address: it never returns
    top[-2] = (void*)entry;
    for (int i = 3; i <= 8; ++i) top[-i] = nullptr;
    c.sp = top - 8;
}

void context_switch(Context& from, Context& to) { cuda_emu_switch_stack(&from.sp, to.sp); }
#else
struct Context {
    ucontext_t uc;
};

void context_start(Context& c, const Stack& stack, void (*entry)()) {
    getcontext(&c.uc);
    c.uc.uc_stack.ss_sp = stack.guard + page_size();
    c.uc.uc_stack.ss_size = kStackBytes;
    c.uc.uc_link = nullptr;
    makecontext(&c.uc, entry, 0);
}

void context_switch(Context& from, Context& to) { swapcontext(&from.uc, &to.uc); }
#endif

// Stacks are kept for the process's life and reused: a launch needs one per thread that is
// suspended at once (the whole block at a barrier), a thread that runs to its end hands its own on.
// Both lists are guarded by launch_mutex.
std::vector<Stack> free_stacks;
std::vector<Stack> all_stacks;  // to recognise an overflow

bool take_stack(Stack* out) {
    if (!free_stacks.empty()) {
        *out = free_stacks.back();
        free_stacks.pop_back();
        return true;
    }
    size_t page = page_size();
    void* map = mmap(nullptr, page + kStackBytes, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return false;
    if (mprotect((char*)map + page, kStackBytes, PROT_READ | PROT_WRITE) != 0) {
        munmap(map, page + kStackBytes);
        return false;
    }
    out->guard = (char*)map;
    all_stacks.push_back(*out);
    return true;
}

// ---- Schedules ----

// MUSCLE_CUDA_EMU_SCHEDULE: the order in which blocks run and threads start and resume.
//   forward        ascending: blocks x fastest, threads by index (so warp after warp)
//   reverse        descending
//   shuffle:SEED   pseudo-random from SEED and the kernel's name, drawn anew at every release
//   runahead       ascending, except that one warp of each block (block index mod warps) goes
//                  first, at the start and after each barrier: it reaches the next barrier before
//                  the other warps start
// Unset or empty means forward. Released threads queue behind those already ready, so warps
// advance in turns from one shuffle to the next.
enum class Order { Forward, Reverse, Shuffle, Runahead };

struct Schedule {
    Order order = Order::Forward;
    uint64_t seed = 0;
};

const char kScheduleVar[] = "MUSCLE_CUDA_EMU_SCHEDULE";

// Empty, with *out set, if the variable is unset or valid; else why not.
std::string read_schedule(Schedule* out) {
    const char* spec = getenv(kScheduleVar);
    if (spec == nullptr || *spec == '\0' || strcmp(spec, "forward") == 0) return {};
    if (strcmp(spec, "reverse") == 0) {
        out->order = Order::Reverse;
        return {};
    }
    if (strcmp(spec, "runahead") == 0) {
        out->order = Order::Runahead;
        return {};
    }
    const char* seed = spec + strlen("shuffle:");
    char* end = nullptr;
    if (strncmp(spec, "shuffle:", strlen("shuffle:")) == 0 && *seed >= '0' && *seed <= '9') {
        errno = 0;
        out->seed = strtoull(seed, &end, 10);
        if (errno == 0 && *end == '\0') {
            out->order = Order::Shuffle;
            return {};
        }
    }
    return format("%s=%s: expected forward, reverse, shuffle:SEED (a decimal number) or runahead", kScheduleVar, spec);
}

// splitmix64: a small, good generator, enough to draw orders.
uint64_t next_random(uint64_t& state) {
    uint64_t z = (state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

template <class T>
void shuffle_in_place(std::vector<T>& v, uint64_t& rng) {
    for (size_t i = v.size(); i > 1; --i) std::swap(v[i - 1], v[next_random(rng) % i]);
}

// ---- Blocks ----

enum class State : uint8_t { Ready, Running, AtBarrier, AtShuffle, Done };

// One CUDA thread.
struct Fiber : cuda_emu::ThreadView {
    Context context;
    Stack stack;
    bool has_stack = false;
    unsigned warp = 0, lane = 0;
    State state = State::Ready;
    Site site = {};         // the barrier or shuffle it waits at
    unsigned mask = 0;      // at a shuffle: the lanes taking part
    unsigned source = 0;    // at a shuffle: the lane whose value it receives
    uint64_t bits = 0;      // at a shuffle: its value, then the one received
};

// One launch: the kernel, its arguments, and the state of the block being run.
struct Launch {
    Launch(const Kernel& k, void* const* a, Schedule s, cuda_emu_dim3 block)
        : kernel(&k), args(a), schedule(s), os_thread(pthread_self()) {
        threads = block.x * block.y * block.z;
        warps = (threads + 31) / 32;
        fibers.resize(threads);
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = fibers[t];
            f.thread_idx = {t % block.x, t / block.x % block.y, t / (block.x * block.y)};
            f.warp = t / 32;
            f.lane = t % 32;
        }
        lanes_present.assign(warps, ~0u);
        if (threads % 32 != 0) lanes_present.back() = (1u << (threads % 32)) - 1;
        waiting.resize(warps);
        // FNV-1a of the name: one seed gives each kernel its own orders, the same at every run.
        rng = s.seed ^ 0xcbf29ce484222325ull;
        for (const char* c = k.name; *c; ++c) rng = (rng ^ (unsigned char)*c) * 0x100000001b3ull;
    }

    const Kernel* kernel;
    void* const* args;
    Schedule schedule;
    uint64_t rng;
    pthread_t os_thread;
    std::vector<uint64_t> block_order;  // shuffle: the blocks' order

    unsigned threads, warps;
    std::vector<Fiber> fibers;
    std::vector<unsigned> lanes_present;  // per warp: the lanes the block has
    std::vector<unsigned> waiting;        // per warp: the lanes at a shuffle
    std::deque<Fiber*> ready;
    std::vector<Fiber*> released;  // scratch for make_ready
    unsigned done = 0;             // threads returned
    unsigned at_barrier = 0;       // threads at a barrier
    Site barrier_site = {};        // where the first of them waits
    bool barrier_mixed = false;    // and some wait elsewhere
    unsigned lead_warp = 0;        // runahead's
    Context scheduler;             // the launching OS thread's own context
    std::string error;             // set when the launch fails

    // A fault, recorded by on_fault before it jumps back to the launch.
    sigjmp_buf fault_jump;
    int fault_signal = 0, fault_code = 0;
    int fault_access = -1;  // 0 read, 1 write, -1 unknown
    uintptr_t fault_address = 0, fault_pc = 0;
};

// The launch being run (one at a time: launch_mutex), for the fibers and the fault handler.
std::mutex launch_mutex;
std::atomic<Launch*> active{nullptr};

Launch& launch() { return *active.load(std::memory_order_relaxed); }
Fiber& running() { return *static_cast<Fiber*>(cuda_emu::current_thread); }

std::string place(Site s) { return format("%s:%d", s.file, s.line); }

// The start of every message about a thread: "file:line: kernel block (x,y,z) warp w lane l: ".
std::string where(const Launch& L, const std::string& at, const Fiber& f) {
    const uint3& b = cuda_emu::launch_view.block_idx;
    return format("%s: %s block (%u,%u,%u) warp %u lane %u: ", at.c_str(), L.kernel->name, b.x, b.y, b.z, f.warp,
                  f.lane);
}

bool same_site(Site a, Site b) {
    return a.line == b.line && (a.file == b.file || strcmp(a.file, b.file) == 0) &&
           (a.op == b.op || strcmp(a.op, b.op) == 0);
}

// Queues `group` (in thread order) as the schedule orders it.
void make_ready(Launch& L, std::vector<Fiber*>& group) {
    for (Fiber* f : group) f->state = State::Ready;
    switch (L.schedule.order) {
        case Order::Forward:
            L.ready.insert(L.ready.end(), group.begin(), group.end());
            break;
        case Order::Reverse:
            L.ready.insert(L.ready.end(), group.rbegin(), group.rend());
            break;
        case Order::Shuffle:
            shuffle_in_place(group, L.rng);
            L.ready.insert(L.ready.end(), group.begin(), group.end());
            break;
        case Order::Runahead:
            for (auto it = group.rbegin(); it != group.rend(); ++it)
                if ((*it)->warp == L.lead_warp) L.ready.push_front(*it);
            for (Fiber* f : group)
                if (f->warp != L.lead_warp) L.ready.push_back(f);
            break;
    }
}

// Back to the scheduler; returns when the scheduler resumes this fiber.
void suspend(Launch& L, Fiber& f) { context_switch(f.context, L.scheduler); }

// Back to the scheduler for good: the thread returned, or the launch failed (L.error is set).
[[noreturn]] void leave(Launch& L, Fiber& f) {
    context_switch(f.context, L.scheduler);
    __builtin_unreachable();
}

// Where every fiber starts: the kernel, with the launch's arguments.
void fiber_main() {
    Launch& L = launch();
    Fiber& f = running();
    L.kernel->call(L.args);
    f.state = State::Done;
    ++L.done;
    leave(L, f);
}

// The lane whose value `lane` receives, as CUDA defines it within segments of `width` lanes: a
// source past the end of the lane's segment (xor, down) gives the lane its own value.
unsigned source_lane(unsigned lane, cuda_emu::ShuffleKind kind, int operand, int width) {
    unsigned w = (unsigned)width, base = lane & ~(w - 1);
    uint64_t s = lane;
    switch (kind) {
        case cuda_emu::ShuffleKind::Index:
            return base + ((unsigned)operand & (w - 1));
        case cuda_emu::ShuffleKind::Xor:
            s = lane ^ (unsigned)operand;
            break;
        case cuda_emu::ShuffleKind::Down:
            s = (uint64_t)lane + (unsigned)operand;
            break;
    }
    return s < base + w ? (unsigned)s : lane;
}

// Completes the shuffle `last` arrived at if every lane of its mask waits at that same call with
// the same mask; otherwise leaves them waiting (the block then stops and diagnose says why).
void complete_shuffle(Launch& L, Fiber& last) {
    Fiber* lanes = &L.fibers[last.warp * 32];
    for (unsigned m = last.mask; m != 0; m &= m - 1) {
        const Fiber& g = lanes[__builtin_ctz(m)];
        if (!same_site(g.site, last.site) || g.mask != last.mask) return;
    }
    uint64_t received[32];
    for (unsigned m = last.mask; m != 0; m &= m - 1) {
        const Fiber& g = lanes[__builtin_ctz(m)];
        if (!(last.mask >> g.source & 1)) {
            L.error = where(L, place(g.site), g) +
                      format("%s reads lane %u, which is not in the mask 0x%08x", g.site.op, g.source, g.mask);
            leave(L, last);
        }
        received[g.lane] = lanes[g.source].bits;
    }
    L.released.clear();
    for (unsigned m = last.mask; m != 0; m &= m - 1) {
        Fiber& g = lanes[__builtin_ctz(m)];
        g.bits = received[g.lane];
        L.released.push_back(&g);
    }
    L.waiting[last.warp] &= ~last.mask;
    make_ready(L, L.released);
}

// Why a block whose threads are not all done has nothing left to run.
std::string diagnose(const Launch& L) {
    // A shuffle that a lane of its mask does not wait at.
    for (const Fiber& f : L.fibers) {
        if (f.state != State::AtShuffle) continue;
        const Fiber* lanes = &L.fibers[f.warp * 32];
        std::string shuffle = format("%s (mask 0x%08x)", f.site.op, f.mask);
        for (unsigned m = f.mask; m != 0; m &= m - 1) {
            const Fiber& g = lanes[__builtin_ctz(m)];
            std::string at = where(L, place(f.site), g);
            if (g.state == State::Done) return at + "returned while its warp waits for it at this " + shuffle;
            if (g.state == State::AtBarrier)
                return at + format("waits at __syncthreads (%s) while its warp waits for it at this ",
                                   place(g.site).c_str()) + shuffle;
            if (!same_site(g.site, f.site) || g.mask != f.mask)
                return at + format("waits at %s (%s, mask 0x%08x) while its warp waits for it at this ", g.site.op,
                                   place(g.site).c_str(), g.mask) + shuffle;
        }
    }
    // A barrier that some thread returned before, or threads at different barriers.
    const Fiber* first = nullptr;
    for (const Fiber& f : L.fibers) {
        if (f.state != State::AtBarrier) continue;
        if (first == nullptr) first = &f;
        if (!same_site(f.site, first->site))
            return where(L, place(first->site), *first) +
                   format("waits at this __syncthreads while warp %u lane %u waits at another, %s", f.warp, f.lane,
                          place(f.site).c_str());
    }
    if (first != nullptr)
        for (const Fiber& g : L.fibers)
            if (g.state == State::Done)
                return where(L, place(first->site), g) +
                       format("returned while %u threads of its block wait at this __syncthreads (each thread must "
                              "reach every barrier)", L.at_barrier);
    // No pattern above (none is known while barriers and shuffles are the only waits).
    auto stuck = std::find_if(L.fibers.begin(), L.fibers.end(), [](const Fiber& f) { return f.state != State::Done; });
    return where(L, place(stuck->site), *stuck) +
           format("deadlock: waits at %s and no thread of its block can run", stuck->site.op);
}

// Runs block `linear` (x fastest) to its end; false, with L.error set, if it fails.
bool run_block(Launch& L, uint64_t linear) {
    const dim3& grid = cuda_emu::launch_view.grid_dim;
    cuda_emu::launch_view.block_idx = {(unsigned)(linear % grid.x), (unsigned)(linear / grid.x % grid.y),
                                       (unsigned)(linear / grid.x / grid.y)};
    uintptr_t shared = (uintptr_t)__start_cuda_emu_shared;
    if (shared != 0) memset(__start_cuda_emu_shared, 0xFF, (uintptr_t)__stop_cuda_emu_shared - shared);
    L.done = 0;
    L.at_barrier = 0;
    std::fill(L.waiting.begin(), L.waiting.end(), 0u);
    L.lead_warp = (unsigned)(linear % L.warps);
    L.released.clear();
    for (Fiber& f : L.fibers) L.released.push_back(&f);
    make_ready(L, L.released);
    while (!L.ready.empty()) {
        Fiber& f = *L.ready.front();
        L.ready.pop_front();
        f.state = State::Running;
        if (!f.has_stack) {
            if (!take_stack(&f.stack)) {
                L.error = format("%s: no memory for the stack of a CUDA thread: %s", L.kernel->name, strerror(errno));
                return false;
            }
            f.has_stack = true;
            context_start(f.context, f.stack, fiber_main);
        }
        cuda_emu::current_thread = &f;
        context_switch(L.scheduler, f.context);
        cuda_emu::current_thread = nullptr;
        if (f.state == State::Done) {
            free_stacks.push_back(f.stack);
            f.has_stack = false;
        }
        if (!L.error.empty()) return false;
    }
    if (L.done == L.threads) return true;
    L.error = diagnose(L);
    return false;
}

void run_blocks(Launch& L) {
    const dim3& grid = cuda_emu::launch_view.grid_dim;
    uint64_t total = (uint64_t)grid.x * grid.y * grid.z;
    if (L.schedule.order == Order::Shuffle) {
        L.block_order.resize(total);
        std::iota(L.block_order.begin(), L.block_order.end(), 0);
        shuffle_in_place(L.block_order, L.rng);
    }
    for (uint64_t i = 0; i < total; ++i) {
        uint64_t block = L.schedule.order == Order::Reverse ? total - 1 - i
                         : L.block_order.empty()             ? i
                                                             : L.block_order[i];
        if (!run_block(L, block)) return;
    }
}

// ---- Faults ----

const int kFaultSignals[] = {SIGSEGV, SIGBUS, SIGFPE};
struct sigaction previous_actions[3];

uintptr_t program_counter(const ucontext_t* uc) {
#if defined(__x86_64__)
    return (uintptr_t)uc->uc_mcontext.gregs[REG_RIP];
#elif defined(__aarch64__)
    return (uintptr_t)uc->uc_mcontext.pc;
#else
    (void)uc;
    return 0;
#endif
}

// 1 for a write, 0 for a read, -1 where the CPU does not say (x86-64's page faults do).
int access_kind(int sig, const ucontext_t* uc) {
#if defined(__x86_64__)
    if (sig == SIGSEGV) return (uc->uc_mcontext.gregs[REG_ERR] & 2) ? 1 : 0;
#endif
    (void)sig;
    (void)uc;
    return -1;
}

// A fault in a kernel's fiber jumps back to its launch; any other goes to the handler that was
// there before the launch installed this one (or to the default action).
void on_fault(int sig, siginfo_t* info, void* context) {
    Launch* L = active.load(std::memory_order_relaxed);
    if (L != nullptr && pthread_equal(pthread_self(), L->os_thread) && cuda_emu::current_thread != nullptr) {
        const ucontext_t* uc = (const ucontext_t*)context;
        L->fault_signal = sig;
        L->fault_code = info->si_code;
        L->fault_address = (uintptr_t)info->si_addr;
        L->fault_pc = program_counter(uc);
        L->fault_access = access_kind(sig, uc);
        siglongjmp(L->fault_jump, 1);
    }
    for (int i = 0; i < 3; ++i) {
        if (kFaultSignals[i] != sig) continue;
        const struct sigaction& old = previous_actions[i];
        if (old.sa_flags & SA_SIGINFO) {
            old.sa_sigaction(sig, info, context);
        } else if (old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN) {
            old.sa_handler(sig);
        } else {
            signal(sig, SIG_DFL);
            raise(sig);
        }
    }
}

// Catches faults for the duration of a launch, on an alternate stack (a fiber that overflows its
// own leaves the handler no room there), and puts the previous handlers back after.
class FaultTrap {
  public:
    FaultTrap() {
        stack_t current;
        if (sigaltstack(nullptr, &current) == 0 && (current.ss_flags & SS_DISABLE)) {
            void* stack = mmap(nullptr, kAltStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (stack != MAP_FAILED) {
                stack_t s = {};
                s.ss_sp = stack;
                s.ss_size = kAltStackBytes;
                if (sigaltstack(&s, nullptr) == 0) own_stack_ = stack;
                else munmap(stack, kAltStackBytes);
            }
        }
        struct sigaction sa = {};
        sa.sa_sigaction = on_fault;
        sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
        sigemptyset(&sa.sa_mask);
        for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &sa, &previous_actions[i]);
    }
    ~FaultTrap() {
        for (int i = 0; i < 3; ++i) sigaction(kFaultSignals[i], &previous_actions[i], nullptr);
        if (own_stack_ != nullptr) {
            stack_t s = {};
            s.ss_flags = SS_DISABLE;
            sigaltstack(&s, nullptr);
            munmap(own_stack_, kAltStackBytes);
        }
    }
    FaultTrap(const FaultTrap&) = delete;
    FaultTrap& operator=(const FaultTrap&) = delete;

  private:
    static constexpr size_t kAltStackBytes = 64 * 1024;
    void* own_stack_ = nullptr;
};

// "file:line" of a code address, from the binary's line table (compiled with -g, not stripped) by
// addr2line; empty if there is none. Slow (a process), but only a failed launch asks.
std::string source_line(uintptr_t pc) {
    Dl_info info;
    if (pc == 0 || dladdr((void*)pc, &info) == 0) return {};
    // Addresses in a position-independent binary are relative to where it was loaded.
    const ElfW(Ehdr)* elf = (const ElfW(Ehdr)*)info.dli_fbase;
    uintptr_t addr = elf->e_type == ET_DYN ? pc - (uintptr_t)info.dli_fbase : pc;
    // The main program's entry has no usable name.
    std::string binary = info.dli_fname != nullptr && info.dli_fname[0] == '/' ? info.dli_fname : "/proc/self/exe";
    if (binary.find('\'') != std::string::npos) return {};
    std::string command = format("addr2line -i -e '%s' 0x%lx 2>/dev/null", binary.c_str(), (unsigned long)addr);
    FILE* pipe = popen(command.c_str(), "r");
    if (pipe == nullptr) return {};
    char line[4096];
    bool got = fgets(line, sizeof line, pipe) != nullptr;
    pclose(pipe);
    // The first line is the innermost inlined function's position; "??:0" or "file:?" is none.
    std::string out = got ? std::string(line, strcspn(line, " \n")) : "";
    if (out.empty() || out[0] == '?' || out.back() == '?') return {};
    return out;
}

// "argument 0 (const float* a), a 4000-byte buffer", or the buffer alone if no argument points into it.
std::string buffer_name(const Launch& L, const Buffer& b) {
    for (unsigned i = 0; i < L.kernel->param_count; ++i) {
        const cuda_emu::Param& p = L.kernel->params[i];
        if (!p.pointer) continue;
        const char* v;
        memcpy(&v, L.args[i], sizeof v);
        if (v >= b.data && v <= b.data + b.size)
            return format("argument %u (%s %s), a %zu-byte buffer", i, p.type, p.name, b.size);
    }
    return format("a %zu-byte device buffer", b.size);
}

std::string describe_address(const Launch& L, uintptr_t addr) {
    {
        std::lock_guard<std::mutex> lock(buffers_mutex);
        if (const Buffer* b = buffer_at(addr)) {
            uintptr_t start = (uintptr_t)b->data, end = start + b->size;
            std::string offset = addr >= end ? format("%zu bytes past the end of ", (size_t)(addr - end))
                                             : format("%zu bytes before the start of ", (size_t)(start - addr));
            return offset + buffer_name(L, *b);
        }
    }
    for (const Stack& s : all_stacks)
        if (addr >= (uintptr_t)s.guard && addr < (uintptr_t)s.guard + page_size())
            return format("the thread overflowed its %zu KiB stack", kStackBytes / 1024);
    return addr < page_size() ? "a null pointer" : "not in a device buffer";
}

std::string describe_fault(const Launch& L) {
    // Without a line table, the kernel's own line, and the address for addr2line.
    std::string line = source_line(L.fault_pc), note;
    if (line.empty()) {
        line = format("%s:%d", L.kernel->file, L.kernel->line);
        note = format(" (no line table for pc %p: the line is the kernel's)", (void*)L.fault_pc);
    }
    std::string at = where(L, line, running());
    if (L.fault_signal == SIGFPE)
        return at + (L.fault_code == FPE_INTDIV ? "integer division by zero" : "arithmetic fault") + " (SIGFPE)" + note;
    const char* access = L.fault_access == 1 ? "writing" : L.fault_access == 0 ? "reading" : "at";
    return at + format("%s %s %p: ", L.fault_signal == SIGBUS ? "SIGBUS" : "SIGSEGV", access, (void*)L.fault_address) +
           describe_address(L, L.fault_address) + note;
}

// Runs the launch's blocks; a fault in a kernel lands back here, from on_fault.
void run_trapped(Launch& L) {
    FaultTrap trap;
    active.store(&L);
    if (sigsetjmp(L.fault_jump, 1) == 0) run_blocks(L);
    else L.error = describe_fault(L);
    active.store(nullptr);
    cuda_emu::current_thread = nullptr;
}

// ---- Launch checks ----

const Kernel* find_kernel(const char* name) {
    for (const Kernel* const* table = cuda_emu_kernel_tables; *table != nullptr; ++table)
        for (const Kernel* k = *table; k->name != nullptr; ++k)
            if (strcmp(k->name, name) == 0) return k;
    return nullptr;
}

// Empty if the arguments fit the kernel's signature, else why not.
std::string check_arguments(const Kernel& k, void* const* args, const size_t* sizes, size_t count) {
    std::string at = format("%s:%d: %s: ", k.file, k.line, k.name);
    if (count != k.param_count) {
        std::string list;
        for (unsigned i = 0; i < k.param_count; ++i)
            list += format("%s%s %s", i ? ", " : "", k.params[i].type, k.params[i].name);
        return at + format("given %zu arguments, takes %u (%s)", count, k.param_count, list.c_str());
    }
    for (unsigned i = 0; i < k.param_count; ++i) {
        const cuda_emu::Param& p = k.params[i];
        std::string arg = format("argument %u (%s %s)", i, p.type, p.name);
        if (sizes[i] != p.size) return at + arg + format(" takes %zu bytes, given %zu", p.size, sizes[i]);
        if (args[i] == nullptr) return at + arg + ": its pointer in args is null";
        if (p.pointer) {
            const void* v;
            memcpy(&v, args[i], sizeof v);
            if (v != nullptr && !in_buffer(v)) return at + arg + format(" = %p is not in a device buffer", v);
        }
    }
    return {};
}

std::string check_shape(const Kernel& k, cuda_emu_dim3 grid, cuda_emu_dim3 block, unsigned shared_bytes) {
    std::string at = format("%s:%d: %s: grid (%u,%u,%u), block (%u,%u,%u): ", k.file, k.line, k.name, grid.x, grid.y,
                            grid.z, block.x, block.y, block.z);
    uint64_t threads = (uint64_t)block.x * block.y * block.z;
    if (threads == 0 || grid.x == 0 || grid.y == 0 || grid.z == 0) return at + "a dimension is 0";
    if (block.x > 1024 || block.y > 1024 || block.z > 64 || threads > k.max_threads)
        return at + format("more threads per block than the kernel's %u (1024 x 1024 x 64 at most)", k.max_threads);
    if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) return at + "over CUDA's (2^31 - 1) x 65535 x 65535";
    if (shared_bytes != 0)
        return at + format("%u bytes of dynamic shared memory: no kernel uses it, so it is not emulated", shared_bytes);
    return {};
}

}  // namespace

// ---- Barriers and shuffles (cuda_emu.h), run on a kernel's fiber ----

void cuda_emu::sync_block(Site site) {
    Launch& L = launch();
    Fiber& f = running();
    f.state = State::AtBarrier;
    f.site = site;
    if (L.at_barrier == 0) {
        L.barrier_site = site;
        L.barrier_mixed = false;
    } else if (!same_site(site, L.barrier_site)) {
        L.barrier_mixed = true;
    }
    if (++L.at_barrier == L.threads && !L.barrier_mixed) {
        L.at_barrier = 0;
        L.released.clear();
        for (Fiber& g : L.fibers) L.released.push_back(&g);
        make_ready(L, L.released);
    }
    suspend(L, f);
}

uint64_t cuda_emu::shuffle(Site site, unsigned mask, uint64_t bits, ShuffleKind kind, int operand, int width) {
    Launch& L = launch();
    Fiber& f = running();
    const char* problem = nullptr;
    if (width < 1 || width > 32 || (width & (width - 1)) != 0) problem = "a width that is not a power of two up to 32";
    else if (!(mask >> f.lane & 1)) problem = "a mask that leaves out the calling lane";
    else if (mask & ~L.lanes_present[f.warp]) problem = "a mask naming lanes the block does not have";
    if (problem != nullptr) {
        L.error = where(L, place(site), f) + format("%s with %s (mask 0x%08x, width %d, block of %u threads)", site.op,
                                                    problem, mask, width, L.threads);
        leave(L, f);
    }
    f.state = State::AtShuffle;
    f.site = site;
    f.mask = mask;
    f.bits = bits;
    f.source = source_lane(f.lane, kind, operand, width);
    L.waiting[f.warp] |= 1u << f.lane;
    if ((L.waiting[f.warp] & mask) == mask) complete_shuffle(L, f);
    suspend(L, f);
    return f.bits;
}

// ---- The C ABI ----

extern "C" const char* cuda_emu_alloc(size_t bytes, void** out) {
    if (out == nullptr) return error("cuda_emu_alloc: out is null");
    *out = nullptr;
    size_t page = page_size();
    if (bytes > SIZE_MAX - 3 * page) return error(format("cuda_emu_alloc: %zu bytes: too many", bytes));
    size_t body = (bytes + page - 1) / page * page;
    size_t map_size = body + 2 * page;
    char* map = (char*)mmap(nullptr, map_size, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (map == MAP_FAILED) return error(format("cuda_emu_alloc: %zu bytes: %s", bytes, strerror(errno)));
    if (body != 0 && mprotect(map + page, body, PROT_READ | PROT_WRITE) != 0) {
        int e = errno;
        munmap(map, map_size);
        return error(format("cuda_emu_alloc: %zu bytes: %s", bytes, strerror(e)));
    }
    char* data = map + page + body - bytes;
    memset(data, 0xFF, bytes);
    std::lock_guard<std::mutex> lock(buffers_mutex);
    buffers[(uintptr_t)map] = Buffer{map, map_size, data, bytes};
    *out = data;
    return nullptr;
}

extern "C" const char* cuda_emu_free(void* device) {
    if (device == nullptr) return nullptr;
    Buffer b;
    {
        std::lock_guard<std::mutex> lock(buffers_mutex);
        const Buffer* found = buffer_at((uintptr_t)device);
        if (found == nullptr || found->data != device)
            return error(format("cuda_emu_free: %p is not a buffer that cuda_emu_alloc returned and that is not freed",
                                device));
        b = *found;
        buffers.erase((uintptr_t)b.map);
    }
    munmap(b.map, b.map_size);
    return nullptr;
}

extern "C" const char* cuda_emu_copy_htod(void* device_dst, const void* host_src, size_t bytes) {
    std::string problem = check_range("cuda_emu_copy_htod: destination", device_dst, bytes);
    if (!problem.empty()) return error(problem);
    if (bytes != 0) memcpy(device_dst, host_src, bytes);
    return nullptr;
}

extern "C" const char* cuda_emu_copy_dtoh(void* host_dst, const void* device_src, size_t bytes) {
    std::string problem = check_range("cuda_emu_copy_dtoh: source", device_src, bytes);
    if (!problem.empty()) return error(problem);
    if (bytes != 0) memcpy(host_dst, device_src, bytes);
    return nullptr;
}

extern "C" const char* cuda_emu_copy_dtod(void* device_dst, const void* device_src, size_t bytes) {
    std::string problem = check_range("cuda_emu_copy_dtod: source", device_src, bytes);
    if (problem.empty()) problem = check_range("cuda_emu_copy_dtod: destination", device_dst, bytes);
    if (!problem.empty()) return error(problem);
    if (bytes != 0) memmove(device_dst, device_src, bytes);
    return nullptr;
}

extern "C" const char* cuda_emu_memset(void* device_dst, int value, size_t bytes) {
    std::string problem = check_range("cuda_emu_memset", device_dst, bytes);
    if (!problem.empty()) return error(problem);
    if (bytes != 0) memset(device_dst, value, bytes);
    return nullptr;
}

extern "C" int cuda_emu_has_kernel(const char* name) { return name != nullptr && find_kernel(name) != nullptr; }

extern "C" const char* cuda_emu_launch(const char* name, cuda_emu_dim3 grid, cuda_emu_dim3 block,
                                       unsigned int shared_bytes, void* const* args, const size_t* arg_sizes,
                                       size_t arg_count) {
    const Kernel* k = name != nullptr ? find_kernel(name) : nullptr;
    if (k == nullptr) return error(format("no emulated kernel named `%s`", name != nullptr ? name : "(null)"));
    if (arg_count != 0 && (args == nullptr || arg_sizes == nullptr))
        return error(format("%s:%d: %s: %zu arguments but a null args or arg_sizes", k->file, k->line, k->name,
                            arg_count));
    std::string problem = check_arguments(*k, args, arg_sizes, arg_count);
    if (problem.empty()) problem = check_shape(*k, grid, block, shared_bytes);
    Schedule schedule;
    if (problem.empty()) problem = read_schedule(&schedule);
    if (!problem.empty()) return error(problem);

    std::lock_guard<std::mutex> lock(launch_mutex);
    cuda_emu::launch_view.grid_dim = {grid.x, grid.y, grid.z};
    cuda_emu::launch_view.block_dim = {block.x, block.y, block.z};
    Launch L(*k, args, schedule, block);
    run_trapped(L);
    for (Fiber& f : L.fibers)
        if (f.has_stack) free_stacks.push_back(f.stack);
    return L.error.empty() ? nullptr : error(L.error);
}
