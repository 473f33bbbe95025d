/*
 * nvtx_logger: a minimal NVTX injection tool for kvtrace's tests.
 *
 * Load it by setting NVTX_INJECTION64_PATH to the compiled shared library and KVTRACE_NVTX_LOG to
 * a file path. Every NVTX event is appended to that file as one tab-separated line of exactly three
 * fields, "<kind>\t<domain>\t<message>\n":
 *
 *   domain    <name>     ""          nvtxDomainCreateA
 *   register  <domain>   <text>      nvtxDomainRegisterStringA
 *   push      <domain>   <message>   nvtxDomainRangePushEx, nvtxRangePushEx, nvtxRangePushA
 *   pop       <domain>   ""          nvtxDomainRangePop, nvtxRangePop
 *   start     <domain>   <message>   nvtxDomainRangeStartEx, nvtxRangeStartEx, nvtxRangeStartA
 *   end       <domain>   <message>   nvtxDomainRangeEnd, nvtxRangeEnd (message of the started range)
 *   mark      <domain>   <message>   nvtxDomainMarkEx, nvtxMarkEx, nvtxMarkA
 *   category  <domain>   <id>=<name> nvtxDomainNameCategoryA, nvtxNameCategoryA
 *
 * The default (NULL) domain is written as an empty field. Tab, newline and backslash inside names
 * are written as \t, \n and \\. Each line goes out in one write(2) on an O_APPEND descriptor, so no
 * buffer is lost if the process crashes and concurrent writers never interleave within a line.
 *
 * The nvtx Python package links several compiled copies of NVTX, and each copy calls
 * InitializeInjectionNvtx2 with its own export table. All state here is therefore process-wide
 * and every call fills the table it is given: an "already initialised" guard would leave the
 * later copies as no-ops.
 *
 * Only the handful of NVTX v3 ABI definitions the tool needs are written out below (layouts and
 * IDs as published in NVTX's nvToolsExt.h and nvtxDetail/nvtxTypes.h), so no headers are needed.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <wchar.h>

/* ---- NVTX v3 ABI subset ------------------------------------------------------------------- */

typedef struct kv_domain {
    char *name;
} kv_domain;

typedef struct kv_string {
    kv_domain *domain;
    char *text;
} kv_string;

typedef kv_domain *nvtxDomainHandle_t; /* opaque to NVTX; the tool chooses what it points to */
typedef kv_string *nvtxStringHandle_t;
typedef uint64_t nvtxRangeId_t;

enum {
    NVTX_MESSAGE_UNKNOWN = 0,
    NVTX_MESSAGE_TYPE_ASCII = 1,
    NVTX_MESSAGE_TYPE_UNICODE = 2,
    NVTX_MESSAGE_TYPE_REGISTERED = 3
};

typedef union nvtxMessageValue_t {
    const char *ascii;
    const wchar_t *unicode;
    nvtxStringHandle_t registered;
} nvtxMessageValue_t;

typedef struct nvtxEventAttributes_v2 {
    uint16_t version;
    uint16_t size;
    uint32_t category;
    int32_t colorType;
    uint32_t color;
    int32_t payloadType;
    int32_t reserved0;
    union {
        uint64_t ullValue;
        int64_t llValue;
        double dValue;
        uint32_t uiValue;
        int32_t iValue;
        float fValue;
    } payload;
    int32_t messageType;
    nvtxMessageValue_t message;
} nvtxEventAttributes_t;

typedef void (*NvtxFunctionPointer)(void);
typedef NvtxFunctionPointer **NvtxFunctionTable;
typedef const void *(*NvtxGetExportTableFunc_t)(uint32_t exportTableId);

typedef struct NvtxExportTableCallbacks {
    size_t struct_size;
    int (*GetModuleFunctionTable)(int callback_module, NvtxFunctionTable *out_table, unsigned int *out_size);
} NvtxExportTableCallbacks;

enum { NVTX_ETID_CALLBACKS = 1 };
enum { NVTX_CB_MODULE_CORE = 1, NVTX_CB_MODULE_CORE2 = 5 };

enum {
    NVTX_CBID_CORE_MarkEx = 1,
    NVTX_CBID_CORE_MarkA = 2,
    NVTX_CBID_CORE_RangeStartEx = 4,
    NVTX_CBID_CORE_RangeStartA = 5,
    NVTX_CBID_CORE_RangeEnd = 7,
    NVTX_CBID_CORE_RangePushEx = 8,
    NVTX_CBID_CORE_RangePushA = 9,
    NVTX_CBID_CORE_RangePop = 11,
    NVTX_CBID_CORE_NameCategoryA = 12
};

enum {
    NVTX_CBID_CORE2_DomainMarkEx = 1,
    NVTX_CBID_CORE2_DomainRangeStartEx = 2,
    NVTX_CBID_CORE2_DomainRangeEnd = 3,
    NVTX_CBID_CORE2_DomainRangePushEx = 4,
    NVTX_CBID_CORE2_DomainRangePop = 5,
    NVTX_CBID_CORE2_DomainNameCategoryA = 8,
    NVTX_CBID_CORE2_DomainRegisterStringA = 10,
    NVTX_CBID_CORE2_DomainCreateA = 12,
    NVTX_CBID_CORE2_DomainDestroy = 14
};

/* ---- process-wide state ------------------------------------------------------------------- */

static pthread_mutex_t g_lock = PTHREAD_MUTEX_INITIALIZER;
static int g_fd = -1;
static kv_domain **g_domains;
static size_t g_domain_count;
static char **g_range_messages; /* indexed by nvtxRangeId_t, for start/end ranges */
static size_t g_range_capacity;
static nvtxRangeId_t g_next_range_id = 1;

static char *dup_or_empty(const char *text) { return strdup(text ? text : ""); }

/* Wide messages are rare; keep ASCII and write anything else as '?'. */
static char *narrow(const wchar_t *text) {
    if (!text) return strdup("");
    size_t len = wcslen(text);
    char *out = malloc(len + 1);
    if (!out) return NULL;
    for (size_t i = 0; i < len; i++) out[i] = (text[i] > 0 && text[i] < 128) ? (char)text[i] : '?';
    out[len] = '\0';
    return out;
}

static const char *domain_name(nvtxDomainHandle_t domain) { return domain ? domain->name : ""; }

/* Returns a heap copy of the message, resolving registered handles; caller frees. */
static char *message_of(const nvtxEventAttributes_t *attr) {
    if (!attr) return strdup("");
    switch (attr->messageType) {
    case NVTX_MESSAGE_TYPE_ASCII: return dup_or_empty(attr->message.ascii);
    case NVTX_MESSAGE_TYPE_UNICODE: return narrow(attr->message.unicode);
    case NVTX_MESSAGE_TYPE_REGISTERED:
        return dup_or_empty(attr->message.registered ? attr->message.registered->text : NULL);
    default: return strdup("");
    }
}

static size_t escape_into(char *out, const char *text) {
    size_t n = 0;
    for (; *text; text++) {
        switch (*text) {
        case '\t': out[n++] = '\\'; out[n++] = 't'; break;
        case '\n': out[n++] = '\\'; out[n++] = 'n'; break;
        case '\\': out[n++] = '\\'; out[n++] = '\\'; break;
        default: out[n++] = *text;
        }
    }
    return n;
}

static int log_fd(void) {
    /* Caller holds g_lock. Opened lazily so the env var is read after the process set it up. */
    if (g_fd < 0) {
        const char *path = getenv("KVTRACE_NVTX_LOG");
        if (path && *path) g_fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    }
    return g_fd;
}

static void log_line_locked(const char *kind, const char *domain, const char *message) {
    int fd = log_fd();
    if (fd < 0) return;
    if (!message) message = "";
    size_t cap = strlen(kind) + 2 * (strlen(domain) + strlen(message)) + 4;
    char stack_buf[512];
    char *line = cap <= sizeof(stack_buf) ? stack_buf : malloc(cap);
    if (!line) return;
    size_t n = escape_into(line, kind);
    line[n++] = '\t';
    n += escape_into(line + n, domain);
    line[n++] = '\t';
    n += escape_into(line + n, message);
    line[n++] = '\n';
    const char *p = line;
    while (n > 0) {
        ssize_t written = write(fd, p, n);
        if (written <= 0) break;
        p += written;
        n -= (size_t)written;
    }
    if (line != stack_buf) free(line);
}

static void log_line(const char *kind, const char *domain, const char *message) {
    pthread_mutex_lock(&g_lock);
    log_line_locked(kind, domain, message);
    pthread_mutex_unlock(&g_lock);
}

static void log_attr(const char *kind, nvtxDomainHandle_t domain, const nvtxEventAttributes_t *attr) {
    char *message = message_of(attr);
    log_line(kind, domain_name(domain), message);
    free(message);
}

static nvtxRangeId_t start_range(nvtxDomainHandle_t domain, char *message) {
    pthread_mutex_lock(&g_lock);
    nvtxRangeId_t id = g_next_range_id++;
    if (id >= g_range_capacity) {
        size_t capacity = g_range_capacity ? g_range_capacity * 2 : 64;
        while (capacity <= id) capacity *= 2;
        char **grown = realloc(g_range_messages, capacity * sizeof(char *));
        if (grown) {
            memset(grown + g_range_capacity, 0, (capacity - g_range_capacity) * sizeof(char *));
            g_range_messages = grown;
            g_range_capacity = capacity;
        }
    }
    log_line_locked("start", domain_name(domain), message);
    if (id < g_range_capacity) {
        g_range_messages[id] = message;
    } else {
        free(message);
    }
    pthread_mutex_unlock(&g_lock);
    return id;
}

static void end_range(nvtxDomainHandle_t domain, nvtxRangeId_t id) {
    pthread_mutex_lock(&g_lock);
    char *message = NULL;
    if (id < g_range_capacity) {
        message = g_range_messages[id];
        g_range_messages[id] = NULL;
    }
    log_line_locked("end", domain_name(domain), message);
    free(message);
    pthread_mutex_unlock(&g_lock);
}

static void name_category(nvtxDomainHandle_t domain, uint32_t category, const char *name) {
    char buf[512];
    snprintf(buf, sizeof(buf), "%u=%s", category, name ? name : "");
    log_line("category", domain_name(domain), buf);
}

/* ---- CORE2 (domain) callbacks ------------------------------------------------------------- */

static nvtxDomainHandle_t cb_DomainCreateA(const char *name) {
    if (!name) name = "";
    pthread_mutex_lock(&g_lock);
    /* One handle per name, so every compiled copy of NVTX sees the same domain. */
    for (size_t i = 0; i < g_domain_count; i++) {
        if (strcmp(g_domains[i]->name, name) == 0) {
            kv_domain *found = g_domains[i];
            log_line_locked("domain", name, "");
            pthread_mutex_unlock(&g_lock);
            return found;
        }
    }
    kv_domain *domain = calloc(1, sizeof(*domain));
    kv_domain **grown = realloc(g_domains, (g_domain_count + 1) * sizeof(*g_domains));
    if (!domain || !grown) {
        free(domain);
        if (grown) g_domains = grown;
        pthread_mutex_unlock(&g_lock);
        return NULL;
    }
    g_domains = grown;
    domain->name = strdup(name);
    g_domains[g_domain_count++] = domain;
    log_line_locked("domain", name, "");
    pthread_mutex_unlock(&g_lock);
    return domain;
}

/* Domains outlive their handles on purpose: another NVTX copy may still hold the same one. */
static void cb_DomainDestroy(nvtxDomainHandle_t domain) { (void)domain; }

static nvtxStringHandle_t cb_DomainRegisterStringA(nvtxDomainHandle_t domain, const char *text) {
    /* Handles are never freed: NVTX has no unregister call and callers keep them for the process. */
    kv_string *handle = calloc(1, sizeof(*handle));
    if (!handle) return NULL;
    handle->domain = domain;
    handle->text = dup_or_empty(text);
    log_line("register", domain_name(domain), handle->text);
    return handle;
}

static void cb_DomainMarkEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t *attr) {
    log_attr("mark", domain, attr);
}

static int cb_DomainRangePushEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t *attr) {
    log_attr("push", domain, attr);
    return 0;
}

static int cb_DomainRangePop(nvtxDomainHandle_t domain) {
    log_line("pop", domain_name(domain), "");
    return 0;
}

static nvtxRangeId_t cb_DomainRangeStartEx(nvtxDomainHandle_t domain, const nvtxEventAttributes_t *attr) {
    return start_range(domain, message_of(attr));
}

static void cb_DomainRangeEnd(nvtxDomainHandle_t domain, nvtxRangeId_t id) { end_range(domain, id); }

static void cb_DomainNameCategoryA(nvtxDomainHandle_t domain, uint32_t category, const char *name) {
    name_category(domain, category, name);
}

/* ---- CORE (default domain) callbacks ------------------------------------------------------ */

static void cb_MarkEx(const nvtxEventAttributes_t *attr) { log_attr("mark", NULL, attr); }
static void cb_MarkA(const char *message) { log_line("mark", "", message); }

static int cb_RangePushEx(const nvtxEventAttributes_t *attr) {
    log_attr("push", NULL, attr);
    return 0;
}

static int cb_RangePushA(const char *message) {
    log_line("push", "", message);
    return 0;
}

static int cb_RangePop(void) {
    log_line("pop", "", "");
    return 0;
}

static nvtxRangeId_t cb_RangeStartEx(const nvtxEventAttributes_t *attr) {
    return start_range(NULL, message_of(attr));
}

static nvtxRangeId_t cb_RangeStartA(const char *message) { return start_range(NULL, dup_or_empty(message)); }
static void cb_RangeEnd(nvtxRangeId_t id) { end_range(NULL, id); }
static void cb_NameCategoryA(uint32_t category, const char *name) { name_category(NULL, category, name); }

/* ---- injection entry point ---------------------------------------------------------------- */

static void fill(NvtxFunctionTable table, unsigned int max_id, unsigned int id, NvtxFunctionPointer fn) {
    /* Slot 0 is invalid and max_id is the last valid index; a NULL slot is one this copy lacks. */
    if (id == 0 || id > max_id || !table[id]) return;
    *table[id] = fn;
}

#define FN(f) ((NvtxFunctionPointer)(f))

__attribute__((visibility("default"))) int InitializeInjectionNvtx2(NvtxGetExportTableFunc_t get_export_table) {
    if (!get_export_table) return 0;
    const NvtxExportTableCallbacks *callbacks = get_export_table(NVTX_ETID_CALLBACKS);
    if (!callbacks || callbacks->struct_size < sizeof(NvtxExportTableCallbacks) ||
        !callbacks->GetModuleFunctionTable) {
        return 0;
    }

    NvtxFunctionTable table = NULL;
    unsigned int max_id = 0;
    if (!callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE, &table, &max_id) || !table) return 0;
    fill(table, max_id, NVTX_CBID_CORE_MarkEx, FN(cb_MarkEx));
    fill(table, max_id, NVTX_CBID_CORE_MarkA, FN(cb_MarkA));
    fill(table, max_id, NVTX_CBID_CORE_RangeStartEx, FN(cb_RangeStartEx));
    fill(table, max_id, NVTX_CBID_CORE_RangeStartA, FN(cb_RangeStartA));
    fill(table, max_id, NVTX_CBID_CORE_RangeEnd, FN(cb_RangeEnd));
    fill(table, max_id, NVTX_CBID_CORE_RangePushEx, FN(cb_RangePushEx));
    fill(table, max_id, NVTX_CBID_CORE_RangePushA, FN(cb_RangePushA));
    fill(table, max_id, NVTX_CBID_CORE_RangePop, FN(cb_RangePop));
    fill(table, max_id, NVTX_CBID_CORE_NameCategoryA, FN(cb_NameCategoryA));

    table = NULL;
    max_id = 0;
    if (!callbacks->GetModuleFunctionTable(NVTX_CB_MODULE_CORE2, &table, &max_id) || !table) return 0;
    fill(table, max_id, NVTX_CBID_CORE2_DomainMarkEx, FN(cb_DomainMarkEx));
    fill(table, max_id, NVTX_CBID_CORE2_DomainRangeStartEx, FN(cb_DomainRangeStartEx));
    fill(table, max_id, NVTX_CBID_CORE2_DomainRangeEnd, FN(cb_DomainRangeEnd));
    fill(table, max_id, NVTX_CBID_CORE2_DomainRangePushEx, FN(cb_DomainRangePushEx));
    fill(table, max_id, NVTX_CBID_CORE2_DomainRangePop, FN(cb_DomainRangePop));
    fill(table, max_id, NVTX_CBID_CORE2_DomainNameCategoryA, FN(cb_DomainNameCategoryA));
    fill(table, max_id, NVTX_CBID_CORE2_DomainRegisterStringA, FN(cb_DomainRegisterStringA));
    fill(table, max_id, NVTX_CBID_CORE2_DomainCreateA, FN(cb_DomainCreateA));
    fill(table, max_id, NVTX_CBID_CORE2_DomainDestroy, FN(cb_DomainDestroy));
    return 1; /* non-zero: success, keep the tool attached */
}
