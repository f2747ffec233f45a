# podsteer_bpf_skeleton(NAME SOURCE) turns SOURCE (a .bpf.c) into NAME.bpf.o and the bpftool
# skeleton NAME.skel.h, and defines the INTERFACE target NAME_skel that puts the header on
# the include path. The skeleton embeds the ELF, so binaries stand alone. A depfile makes
# edits to included headers (the ABI header among them) rebuild the object.
set(PODSTEER_BPF_INCLUDES
    ${PROJECT_SOURCE_DIR}/maps
    ${PROJECT_SOURCE_DIR}/bpf)

function(podsteer_bpf_skeleton NAME SOURCE)
  set(src ${CMAKE_CURRENT_SOURCE_DIR}/${SOURCE})
  set(obj ${CMAKE_CURRENT_BINARY_DIR}/${NAME}.bpf.o)
  set(dep ${CMAKE_CURRENT_BINARY_DIR}/${NAME}.bpf.d)
  set(skel_dir ${CMAKE_CURRENT_BINARY_DIR}/skel)
  set(skel ${skel_dir}/${NAME}.skel.h)
  set(inc_flags)
  foreach(dir ${PODSTEER_BPF_INCLUDES} ${CMAKE_CURRENT_SOURCE_DIR}/bpf)
    list(APPEND inc_flags -I${dir})
  endforeach()
  add_custom_command(
    OUTPUT ${obj}
    COMMAND ${BPF_CLANG} -g -O2 -target bpf -mcpu=v3 -D__TARGET_ARCH_x86
            ${inc_flags} -idirafter /usr/include/x86_64-linux-gnu
            -Wall -Werror -MD -MF ${dep} -c ${src} -o ${obj}
    DEPENDS ${src}
    DEPFILE ${dep}
    COMMENT "BPF ${SOURCE}"
    VERBATIM)
  add_custom_command(
    OUTPUT ${skel}
    COMMAND ${CMAKE_COMMAND} -E make_directory ${skel_dir}
    COMMAND ${BPFTOOL} gen skeleton ${obj} name ${NAME} > ${skel}
    DEPENDS ${obj}
    COMMENT "skeleton ${NAME}.skel.h")
  add_custom_target(${NAME}_skel_gen DEPENDS ${skel})
  add_library(${NAME}_skel INTERFACE)
  add_dependencies(${NAME}_skel ${NAME}_skel_gen)
  target_include_directories(${NAME}_skel INTERFACE ${skel_dir})
  set_property(GLOBAL APPEND PROPERTY PODSTEER_BPF_OBJECTS ${obj})
endfunction()
